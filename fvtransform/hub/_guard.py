"""Bounds on what a hub server may make a download do: time, bytes, header values and repo paths.

``huggingface_hub``'s own timeouts are per socket read, so a server that
drips one byte a second (in the headers or the body) is never cut off. This
module adds, for the downloads fvtransform starts:

- an overall deadline. The download runs in a worker thread the caller waits
  on with a timeout (the caller always gets its answer in time, whatever the
  client does: back-off sleeps, DNS, Xet), and every socket read, write and
  connect of the worker is bounded by the time left and fails once it is
  spent, so the worker ends too instead of dripping on forever;
- a byte budget per file: a file announced as ``n`` bytes may not make the
  socket deliver, nor its compressed body decode to, much more than ``n`` (an
  endless body, endless headers or a gzip bomb end early; stacked content
  encodings are refused);
- checks of the hub's response headers before ``huggingface_hub`` uses them:
  ``ETag`` / ``X-Linked-Etag`` name the cache blob and ``X-Repo-Commit`` the
  snapshot folder, so each must be a hash (40 or 64 hex digits), never a path
  such as ``../../x``.

Both are installed in ``huggingface_hub``'s shared HTTP client by wrapping its
client factory (a factory the user set is kept and wrapped); outside a
download started here nothing changes (no deadline, no budget).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

from fvtransform.errors import UnsafeFileError, UsageError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_PATH_CHARS",
    "MAX_SEGMENT_BYTES",
    "Abort",
    "check_repo_path",
    "timeout_from_env",
    "run_with_deadline",
    "budget",
    "expect",
    "remaining",
    "install",
]

T = TypeVar("T")

#: The default overall deadline of one download (a model with its components, or a LoRA), in seconds;
#: ``timeout=`` or the ``FVT_HUB_TIMEOUT`` environment variable change it.
DEFAULT_TIMEOUT_S = 4 * 3600.0
#: After the deadline, how long the caller waits for the worker to notice and clean up before it returns.
GRACE_S = 2.0
#: A repo path is refused above these lengths (the hub's own limits are lower).
MAX_PATH_CHARS = 1024
MAX_SEGMENT_BYTES = 255
_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Abort(Exception):
    """Raised inside the HTTP client to end a download; never retried by ``huggingface_hub``.

    Deliberately not an httpx/httpcore exception (those are retried or resumed),
    and not an :class:`~fvtransform.errors.FvTransformError` (the download
    wrapper turns it into one that names the repo and revision).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------------------------ repo paths
def check_repo_path(path: object, *, what: str) -> str:
    """``path`` if it is a safe relative repo path (``a/b.json``); else :class:`UnsafeFileError`.

    Every segment must be non-empty, not ``.`` or ``..``, free of control
    characters (NUL included) and backslashes, and at most 255 UTF-8 bytes; the
    whole path at most 1024 characters and never absolute.

    >>> check_repo_path("transformer/config.json", what="tree")
    'transformer/config.json'
    >>> check_repo_path("../x", what="org/m@main: tree listing")
    Traceback (most recent call last):
    ...
    fvtransform.errors.UnsafeFileError: org/m@main: tree listing: repo path '../x' is not allowed: segment '..' (a safe path is relative, with no '.', '..' or empty segments, no control characters or backslashes); the server is not a trustworthy hub
    """
    if not isinstance(path, str):
        raise UnsafeFileError(f"{what}: a repo path must be a string, found {type(path).__name__}; the server is not a trustworthy hub")
    shown = path if len(path) <= 200 else path[:200] + f"... ({len(path)} characters)"
    if len(path) > MAX_PATH_CHARS:
        raise UnsafeFileError(f"{what}: repo path {shown!r} is longer than {MAX_PATH_CHARS} characters; the server is not a trustworthy hub")
    if path.startswith("/"):
        raise UnsafeFileError(f"{what}: repo path {shown!r} is absolute; the server is not a trustworthy hub")
    for seg in path.split("/"):
        bad = seg in ("", ".", "..") or "\\" in seg or _CONTROL.search(seg) is not None
        if bad or len(seg.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            why = f"segment {seg!r}" if bad else f"a segment longer than {MAX_SEGMENT_BYTES} bytes"
            raise UnsafeFileError(
                f"{what}: repo path {shown!r} is not allowed: {why} (a safe path is relative, with no '.', '..' or "
                "empty segments, no control characters or backslashes); the server is not a trustworthy hub"
            )
    return path


# ------------------------------------------------------------------------------------------ deadline
_local = threading.local()


def timeout_from_env(timeout: float | None) -> float:
    """The deadline in seconds: ``timeout`` if given, else ``FVT_HUB_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`."""
    if timeout is None:
        raw = os.environ.get("FVT_HUB_TIMEOUT")
        if raw is None or raw.strip() == "":
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(raw)
        except ValueError:
            raise UsageError(f"FVT_HUB_TIMEOUT={raw!r} is not a number of seconds; set it to e.g. 3600") from None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise UsageError(f"download timeout={str(timeout)[:100]!r} ({type(timeout).__name__}) is not a number of seconds; pass e.g. timeout=3600")
    if not (timeout > 0 and timeout < float("inf")):
        raise UsageError(f"download timeout {timeout!r} must be a positive, finite number of seconds")
    return float(timeout)


def remaining() -> float | None:
    """Seconds left before this thread's download deadline, or ``None`` outside a bounded download."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


@contextlib.contextmanager
def _deadline_in_this_thread(deadline: float | None) -> Iterator[None]:
    old = getattr(_local, "deadline", None)
    _local.deadline = deadline
    try:
        yield
    finally:
        _local.deadline = old


def bounded(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` wrapped to run under the calling thread's deadline in another thread (a worker pool)."""
    deadline = getattr(_local, "deadline", None)

    def run() -> T:
        with _deadline_in_this_thread(deadline):
            return fn()

    return run


@contextlib.contextmanager
def budget(n_bytes: int | None, what: str) -> Iterator[None]:
    """Within the block, the socket reads of this thread may deliver at most ``n_bytes`` bytes in all."""
    old = getattr(_local, "budget", None)
    _local.budget = None if n_bytes is None else [n_bytes, what, n_bytes]
    try:
        yield
    finally:
        _local.budget = old


@contextlib.contextmanager
def expect(commit: str, etag: str, what: str) -> Iterator[None]:
    """Within the block, the hub's resolve answers in this thread must name ``commit`` and ``etag``.

    ``X-Repo-Commit`` names the snapshot folder and ``ETag`` / ``X-Linked-Etag``
    the blob ``huggingface_hub`` links the file to; a value other than the
    listing's (another commit, another file's blob) would make it reuse or
    overwrite a file of another snapshot, so the answer is refused
    (:class:`Abort` of kind ``"listing"``) before anything is written.
    """
    old = getattr(_local, "expect", None)
    _local.expect = (commit, etag, what)
    try:
        yield
    finally:
        _local.expect = old


def _spend(n: int) -> None:
    b = getattr(_local, "budget", None)
    if b is None:
        return
    b[0] -= n
    if b[0] < 0:
        raise Abort("size", f"{b[1]}: the server sent more bytes than announced or allowed ({b[2]}); refused before reading on")


def _bounded_timeout(timeout: float | None) -> float | None:
    left = remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise Abort("timeout", "the download deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream:
    """A network stream whose every operation is bounded by the thread's deadline and byte budget."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            data = self._inner.read(max_bytes, _bounded_timeout(timeout))
        except Exception:
            left = remaining()
            if left is not None and left <= 0:  # the read timed out because the deadline came
                raise Abort("timeout", "the download deadline passed") from None
            raise
        _spend(len(data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded_timeout(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> "_Stream":
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _bounded_timeout(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend:
    """A network backend (httpcore's interface) whose streams are :class:`_Stream`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> _Stream:
        return _Stream(self._inner.connect_tcp(host, port, _bounded_timeout(timeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> _Stream:
        return _Stream(self._inner.connect_unix_socket(path, _bounded_timeout(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        left = remaining()
        if left is not None and seconds >= left:
            raise Abort("timeout", "the download deadline passed")
        self._inner.sleep(seconds)


class _BoundedDecoder:
    """A content decoder (gzip, br, ...) that may produce at most ``limit`` bytes: no decompression bombs."""

    def __init__(self, inner: Any, limit: int, what: str) -> None:
        self._inner, self._left, self._limit, self._what = inner, limit, limit, what

    def _count(self, parts: Any) -> Iterator[bytes]:
        for part in parts:
            self._left -= len(part)
            if self._left < 0:
                raise Abort("size", f"{self._what}: the server's compressed body decodes to more than {self._limit} bytes; "
                                    "refused before reading on")
            yield part

    def decode(self, data: bytes) -> Iterator[bytes]:
        return self._count(self._inner.decode(data))

    def flush(self) -> Iterator[bytes]:
        return self._count(self._inner.flush())


def _bound_decoding(response: Any) -> None:
    """Within a byte budget, a compressed body may decode to no more than the budget either."""
    b = getattr(_local, "budget", None)
    if b is None:
        return
    codings = [c.strip().lower() for c in response.headers.get_list("content-encoding", split_commas=True)]
    codings = [c for c in codings if c not in ("", "identity")]
    if len(codings) > 1:
        raise Abort("size", f"{b[1]}: the server stacks content encodings {codings[:8]}; refused (a decompression bomb)")
    if codings and hasattr(response, "_get_content_decoder"):
        response._decoder = _BoundedDecoder(response._get_content_decoder(), b[2], b[1])


def _check_response(response: Any) -> None:
    """Refuse hub response headers that would become paths in the cache unless they are hashes; bound decoding."""
    left = remaining()
    if left is not None and left <= 0:
        raise Abort("timeout", "the download deadline passed")
    _bound_decoding(response)
    url = urlparse(str(response.request.url))
    from huggingface_hub import constants

    if url.netloc != urlparse(constants.ENDPOINT).netloc or "/resolve/" not in url.path:
        return  # only the hub's resolve answers carry the headers the cache layout is built from
    want = getattr(_local, "expect", None)
    for name in ("X-Linked-Etag", "ETag"):
        value = response.headers.get(name)
        if value is not None:
            etag = value.removeprefix("W/").strip('"')
            if not _HASH.fullmatch(etag):
                raise Abort("header", f"the hub's {name} header {value[:100]!r} is not a hash (40 or 64 hex digits)")
            if want is not None and etag != want[1]:
                raise Abort("listing", f"{want[2]}: the hub's {name} header names blob {etag}, but the repo listing says {want[1]}")
            break  # huggingface_hub uses the first one present
    commit = response.headers.get("X-Repo-Commit")
    if commit is not None and not _COMMIT.fullmatch(commit):
        raise Abort("header", f"the hub's X-Repo-Commit header {commit[:100]!r} is not a 40-hex commit hash")
    if commit is not None and want is not None and commit != want[0]:
        raise Abort("listing", f"{want[2]}: the hub's X-Repo-Commit header names commit {commit}, but the repo listing is of {want[0]}")


def _wrap_client(client: Any) -> Any:
    hooks = dict(client.event_hooks)
    hooks["response"] = [*hooks.get("response", []), _check_response]
    client.event_hooks = hooks
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if pool is not None and backend is not None and not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)
    return client


_install_lock = threading.Lock()


def install() -> None:
    """Wrap ``huggingface_hub``'s client factory (once; again if someone replaced it since)."""
    from huggingface_hub.utils import _http as hf_http

    with _install_lock:
        current = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http.default_client_factory)
        if getattr(current, "_fvt_guarded", False):
            return

        def factory() -> Any:
            return _wrap_client(current())

        factory._fvt_guarded = True  # type: ignore[attr-defined]
        hf_http.set_client_factory(factory)


def run_with_deadline(fn: Callable[[], T], timeout_s: float, *, on_timeout: Callable[[bool], Exception]) -> T:
    """``fn()`` in a worker thread under a deadline ``timeout_s`` from now.

    The caller gets ``fn``'s result or exception, or ``on_timeout(abandoned)``
    raised at most :data:`GRACE_S` after the deadline, whatever ``fn`` is
    blocked in (``abandoned``: the worker had not ended by then). The worker's
    network operations fail once the deadline passed, so it ends soon after
    too (it is a daemon thread; nothing waits for it at exit).
    """
    deadline = time.monotonic() + timeout_s
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        with _deadline_in_this_thread(deadline):
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()

    threading.Thread(target=work, name="fvt-hub-download", daemon=True).start()
    if not done.wait(timeout_s + GRACE_S):
        raise on_timeout(True)
    if "error" in box:
        e = box.pop("error")
        if isinstance(e, Abort) and e.kind == "timeout":
            raise on_timeout(False) from None
        raise e
    return box["value"]
