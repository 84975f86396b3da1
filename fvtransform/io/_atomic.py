"""Writers that lose nothing: one lock per destination, atomic file and folder replacement, typed errors.

Every writer of the library goes through this module:

* :func:`writer_lock` serialises writers of one destination (a ``flock`` on
  ``.<name>.fvt-lock`` beside it, removed on release); a second writer waits,
  and after :data:`LOCK_TIMEOUT_S` fails with :class:`WriteError`. Every
  writer of a path ``p`` (a file or a folder) takes two locks, outer first:
  the lock of its folder ``p.parent`` (the one a swap of that folder takes)
  and the lock of ``p``. So a file saved into folder ``d`` and a folder swap
  of ``d`` are serialised (the swap cannot put back a copy without the new
  file), and two writers never deadlock (locks are taken shallow to deep).
  Writes two or more levels below a folder being swapped (``d/sub/x``) are not
  serialised with that swap. Where the parent's lock cannot be created (a
  read-only or foreign grand-parent), no swap of the parent is possible
  either, and only the path's own lock is taken. Names too long to carry the
  marks (over 200 bytes) use a hash of the name in their lock, temporary and
  old-folder names.
* :func:`atomic_file` writes one file: bytes to a temporary beside it,
  fsync, rename.
* :func:`write_folder` writes a set of files as one unit: a new folder is
  built beside the old one, the old folder's entries that the writer does not
  own are carried over as hard links (never read, never lost) and the two
  folders are exchanged atomically (``renameat2(RENAME_EXCHANGE)``; without it,
  two renames, and a crash between them is repaired by the next writer, which
  puts the old folder back instead of deleting it).
* Destinations that are symbolic links, FIFOs, devices or sockets are refused
  before anything is opened; ``OSError`` (a full disk, a read-only file
  system, no permission) becomes :class:`WriteError`, after the temporaries
  are removed and with the previous version intact.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
from pathlib import Path
import re
import secrets
import shutil
import stat
import time
from typing import Any, BinaryIO

from fvtransform.errors import FvTransformError, UnsafeFileError, UsageError, WriteError
from fvtransform._messages import format_keys
from fvtransform.io._safetensors import TMP_MARK, fsync_dir

__all__ = [
    "LOCK_MARK",
    "OLD_MARK",
    "LOCK_TIMEOUT_S",
    "writer_lock",
    "atomic_file",
    "write_folder",
    "write_json_atomic",
    "check_destination",
    "typed_os_errors",
    "swap_in",
    "recover_swap",
    "check_path",
    "side_name",
    "is_temp_name",
    "is_any_temp",
]

#: The lock file of destination ``x`` is ``.x.fvt-lock`` beside it (present only while a writer holds it).
LOCK_MARK = ".fvt-lock"
#: Without RENAME_EXCHANGE the old folder waits under ``.x.fvt-old-<hex>`` between two renames.
OLD_MARK = ".fvt-old-"
#: How long a writer waits for another writer of the same destination before failing.
LOCK_TIMEOUT_S = 600.0

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another destination",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another destination",
    errno.EROFS: "the file system is read-only: choose another destination",
    errno.EACCES: "no permission to write there: choose another destination or fix its permissions",
    errno.EPERM: "the operation is not permitted there: choose another destination",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another destination",
    errno.EISDIR: "the destination is a folder where a file was expected",
    errno.ENAMETOOLONG: "the file name is too long",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


#: Names longer than this (in bytes) are hashed in the names of their lock, temporaries and old folders.
_LONG_NAME = 200
#: The random suffix of a temporary (``secrets.token_hex(6)``) and of an old folder (``token_hex(4)``).
_TMP_HEX, _OLD_HEX = 12, 8


def _tag(name: str) -> str:
    """``name``, or a 32-hex-digit hash of it when it is too long to carry a mark within 255 bytes."""
    raw = os.fsencode(name)
    return name if len(raw) <= _LONG_NAME else hashlib.sha256(raw).hexdigest()[:32]


def side_name(name: str, mark: str, suffix: str = "") -> str:
    """The name of a lock, temporary or old folder of ``name``: ``.<name><mark><suffix>`` (hashed when long)."""
    return f".{_tag(name)}{mark}{suffix}"


def is_temp_name(entry: str, name: str) -> bool:
    """Whether ``entry`` is exactly a temporary this module makes for ``name`` (``.<name>.fvt-tmp-`` + 12 hex digits)."""
    return re.fullmatch(re.escape(side_name(name, TMP_MARK)) + f"[0-9a-f]{{{_TMP_HEX}}}", entry) is not None


def is_any_temp(entry: str) -> bool:
    """Whether ``entry`` has the exact shape of one of this module's temporaries, for any name."""
    return re.fullmatch(r"\..+" + re.escape(TMP_MARK) + f"[0-9a-f]{{{_TMP_HEX}}}", entry, flags=re.DOTALL) is not None


def check_path(path: str | os.PathLike[str], what: str = "destination") -> Path:
    """``path`` as a :class:`Path`; a NUL character or an empty path is a :class:`UsageError`."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text or not text:
        raise UsageError(f"{text!r}: the {what} path is empty or holds a NUL character; pass a real path")
    return Path(text)


def _clean_stale(folder: Path, name: str) -> None:
    """Remove temporaries a killed writer of ``name`` left in ``folder``: only names of their exact shape."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if is_temp_name(entry, name):
            _remove_ours(folder / entry)


@contextlib.contextmanager
def typed_os_errors(dest: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into :class:`WriteError` naming ``dest`` (our own errors pass)."""
    try:
        yield
    except FvTransformError:
        raise
    except OSError as e:
        hint = _HINTS.get(e.errno or 0, "check the destination")
        where = f" at {e.filename}" if e.filename else ""
        raise WriteError(
            f"{dest}: writing failed{where}: {e.strerror or e} ({errno.errorcode.get(e.errno or 0, 'OSError')}); {hint}. "
            "The previous version, if any, is intact and no temporary file is left."
        ) from e


def check_destination(dest: Path, *, folder: bool) -> None:
    """Refuse a destination that is a symlink, FIFO, device or socket, or a file where a folder goes (and back)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise UnsafeFileError(
            f"{dest}: the destination is a symbolic link (to {os.readlink(dest)!r}); refusing to write through or "
            "replace it; pass the real path"
        )
    if stat.S_ISDIR(mode):
        if not folder:
            raise WriteError(f"{dest} is a folder; pass a file path")
        return
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{dest}: the destination is {_kind(mode)}, not a regular file or folder; refusing to open or replace it")
    if folder:
        raise WriteError(f"{dest} is a file; this writer writes a folder there")


#: Where the lock of a parent folder cannot be made, no writer can swap that folder either (it writes there too).
_NO_PARENT_LOCK = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)


#: ``open`` errors meaning the lock name is taken by something else than a lock file (a folder, a link).
_SQUATTED = (errno.EISDIR, errno.ELOOP, errno.ENXIO)


def _not_our_lock(st: os.stat_result) -> str | None:
    """What ``st`` is when it cannot be a lock file of ours (not a regular file, or another user's); else None."""
    if not stat.S_ISREG(st.st_mode):
        return _kind(st.st_mode)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"a file of another user (uid {st.st_uid})"
    return None


@contextlib.contextmanager
def writer_lock(dest: Path, timeout: float | None = None, *, optional: bool = False) -> Iterator[None]:
    """Hold the lock of ``dest`` (``.<name>.fvt-lock`` beside it) for the block; wait at most ``timeout`` seconds.

    With ``optional``, a lock file that cannot be created for lack of permission
    (or on a read-only file system), or whose name holds something else than a
    regular file of ours (a FIFO, folder, link, another user's file), is skipped
    instead of failing: the destination's own lock, which refuses such entries,
    then stops any swap of ``dest`` too.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX: no lock; the writes stay atomic)
        yield
        return
    lock = dest.parent / side_name(dest.name, LOCK_MARK)
    deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout is None else timeout)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            squat = _not_our_lock(os.lstat(lock))  # checked before opening: a device is never opened
        except FileNotFoundError:
            squat = None
        fd = -1
        if squat is None:
            try:
                fd = os.open(lock, flags, 0o600)
            except OSError as e:
                if optional and e.errno in _NO_PARENT_LOCK + _SQUATTED:
                    yield
                    return
                if e.errno == errno.ELOOP:
                    raise UnsafeFileError(f"{lock}: the lock file of {dest} is a symbolic link; refusing to follow it; remove it") from None
                raise
            squat = _not_our_lock(os.fstat(fd))
        if squat is not None:
            if fd >= 0:
                os.close(fd)
            if optional:  # another user's entry on a shared parent's lock name: that lock cannot be taken
                yield
                return
            raise UnsafeFileError(f"{lock}: the lock file of {dest} is {squat}; refusing to use it; remove it")
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise WriteError(
                    f"{dest}: another writer has held {lock.name} for longer than {LOCK_TIMEOUT_S if timeout is None else timeout:g} s; "
                    "wait for it to finish, or remove the lock file if no fvtransform process is running"
                ) from None
            time.sleep(0.005)
            continue
        try:  # the previous holder may have removed the file between our open and our lock
            now = os.stat(lock, follow_symlinks=False)
            same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def unit_locks(dest: Path) -> Iterator[Path]:
    """Hold the lock of ``dest``'s folder (as a swap of that folder takes it), then the lock of ``dest``.

    Yields ``dest`` with its folder's real path, so that every spelling of one
    destination (through a symlinked parent, relative) takes the same locks.
    """
    parent = Path(os.path.realpath(dest.parent))
    dest = parent / dest.name
    with contextlib.ExitStack() as stack:
        if parent.parent != parent:
            stack.enter_context(writer_lock(parent, optional=True))
        stack.enter_context(writer_lock(dest))
        yield dest


@contextlib.contextmanager
def _parents_made(dest: Path) -> Iterator[None]:
    """Create ``dest``'s missing parent folders; if the block fails, remove those it created that are still empty.

    A refused write leaves the destination as it was; only empty folders this
    call made are removed (``rmdir`` never removes anything a user put there).
    """
    made: list[Path] = []
    p = dest.parent
    while not os.path.lexists(p) and p.parent != p:
        made.append(p)
        p = p.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], *, replace_check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; when the block ends, fsync it and rename it onto ``dest``.

    The locks of ``dest`` and of its folder are held throughout; ``replace_check(dest)``,
    if given, is called under them when ``dest`` exists (it raises to refuse
    replacing it). On any error the temporary is removed, ``dest`` is untouched,
    and an ``OSError`` becomes :class:`WriteError`.
    """
    dest = check_path(dest)
    with typed_os_errors(dest), _parents_made(dest):
        check_destination(dest, folder=False)
        with unit_locks(dest) as real:
            check_destination(dest, folder=False)
            if replace_check is not None and os.path.lexists(real):
                replace_check(dest)
            _clean_stale(real.parent, real.name)
            tmp = real.parent / side_name(real.name, TMP_MARK, secrets.token_hex(_TMP_HEX // 2))
            dest = real
            try:
                yield tmp
                fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    _keep_mode(dest, fd)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
            finally:
                _remove_ours(tmp)


def _keep_mode(dest: Path, fd: int) -> None:
    """Give the new version (open as ``fd``) the permission bits of the ``dest`` it replaces, if any.

    A re-save, like ``open(dest, "wb")``, never changes who may read the
    destination; a new destination keeps the umask default.
    """
    try:
        old = os.lstat(dest)
    except FileNotFoundError:
        return
    if stat.S_IFMT(old.st_mode) == stat.S_IFMT(os.fstat(fd).st_mode):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))


def write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as indented, key-sorted JSON to ``path``, atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _remove_ours(path: Path) -> None:
    """Remove a temporary this process made (a file or a folder), never following a link."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def write_folder(
    dest: str | os.PathLike[str],
    names: Collection[str],
    build: Callable[[Path], None],
    *,
    owned: Callable[[Path], set[str] | None],
    overwrite: bool = False,
    require_own: bool = False,
    what: str = "output",
) -> None:
    """Write the files ``names`` into folder ``dest`` as one unit, keeping every other entry.

    ``build(tmp)`` writes exactly ``names`` into an empty temporary folder.
    ``owned(dest)`` lists the entries of the existing ``dest`` that this writer
    wrote before (from its own record), or None when ``dest`` is not a previous
    output of this kind. Owned entries are replaced or dropped; every other entry
    is carried into the new folder as a hard link. An entry not owned whose name
    the writer needs is refused unless ``overwrite``; with ``require_own``, so is
    any non-empty folder that is not a previous output. Nothing is deleted that
    the writer cannot account for.

    Raises:
        WriteError: a refused destination (``dest`` is a file), a full disk, a read-only folder, a lock held too long.
        UnsafeFileError: ``dest`` is a symlink, FIFO, device or socket.
    """
    dest = check_path(dest)
    with typed_os_errors(dest), _parents_made(dest):
        check_destination(dest, folder=True)
        with unit_locks(dest) as real:
            check_destination(dest, folder=True)
            dest = real
            recover_swap(dest)
            _clean_stale(dest.parent, dest.name)
            keep = _entries_to_keep(dest, set(names), owned, overwrite=overwrite, require_own=require_own, what=what)
            tmp = dest.parent / side_name(dest.name, TMP_MARK, secrets.token_hex(_TMP_HEX // 2))
            tmp.mkdir()
            try:
                build(tmp)
                for name in keep:
                    _carry(dest / name, tmp / name, dest)
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    _keep_mode(dest, fd)
                finally:
                    os.close(fd)
                fsync_dir(tmp)
                swap_in(tmp, dest)
            finally:
                _remove_ours(tmp)


def _entries_to_keep(dest: Path, names: set[str], owned: Callable[[Path], set[str] | None], *, overwrite: bool,
                     require_own: bool, what: str) -> list[str]:
    """The entries of ``dest`` to carry into the new version; refuses what the write would destroy.

    Only stale temporaries of the exact shape this module makes are left behind
    (no writer of an entry of ``dest`` runs: each holds ``dest``'s lock, which
    this writer holds). Owned entries are dropped only if they are regular files;
    a folder (or FIFO, device, socket) where a file goes is refused, never removed.
    """
    if not dest.is_dir():
        return []
    entries = sorted(e for e in os.listdir(dest) if not is_any_temp(e))
    if not entries:
        return []
    mine = owned(dest)
    if mine is None and require_own and not overwrite:
        raise WriteError(
            f"{dest}: the folder is not empty ({format_keys(entries, 6)}) and is not a previous {what}; refusing to "
            "write into it. Choose a new or empty folder, or pass --overwrite (overwrite=True), which replaces "
            "only the files this writer writes and keeps every other file"
        )
    modes = {e: os.lstat(dest / e).st_mode for e in entries}
    blocked = [e for e in entries if e in names and not (stat.S_ISREG(modes[e]) or stat.S_ISLNK(modes[e]))]
    if blocked:
        e = blocked[0]
        raise WriteError(
            f"{dest / e} is {_kind(modes[e])} where this {what} writes a file; refusing to replace it (a writer never "
            "removes a folder or special file it did not create). Move it away or choose another destination"
        )
    # a record names files; only regular files of this folder are ever dropped
    mine = {e for e in (mine or set()) if e in modes and stat.S_ISREG(modes[e])}
    clash = [e for e in entries if e in names and e not in mine]
    if clash and not overwrite:
        raise WriteError(
            f"{dest}: {format_keys(clash, 6)} would be replaced, but this {what} did not write them; refusing. "
            "Choose another folder, or pass --overwrite (overwrite=True) to replace them"
        )
    return [e for e in entries if e not in mine and e not in names]


def _carry(src: Path, dst: Path, dest: Path) -> None:
    """Keep ``src`` under ``dst``: hard links (no byte read, nothing lost), a copy only where a link fails."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        for child in sorted(os.listdir(src)):
            _carry(src / child, dst / child, dest)
        shutil.copystat(src, dst, follow_symlinks=False)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(src, dst, follow_symlinks=False)
        else:
            raise WriteError(
                f"{dest}: cannot keep {src.relative_to(dest)} ({_kind(st.st_mode)}) in the new version of the folder "
                "(no hard link possible); move it away, then write again"
            ) from None


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def swap_in(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` at ``folder``: an atomic exchange, else two renames repaired by :func:`recover_swap`."""
    if not os.path.lexists(folder):
        os.rename(tmp, folder)
    elif exchange(tmp, folder):
        pass  # tmp now holds the old version; the caller removes it
    else:
        old = folder.parent / side_name(folder.name, OLD_MARK, secrets.token_hex(_OLD_HEX // 2))
        os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        _remove_ours(old)
    fsync_dir(folder.parent)


def recover_swap(folder: Path) -> None:
    """Repair a swap cut between its two renames: put the old version back where nothing replaced it.

    Called with the lock held. When ``folder`` is missing, the newest
    ``.<name>.fvt-old-<8 hex>`` is renamed back (the next write, not a deletion,
    then replaces it); when ``folder`` exists, leftovers are removed. Only
    names of that exact shape are touched.
    """
    shape = re.compile(re.escape(side_name(folder.name, OLD_MARK)) + f"[0-9a-f]{{{_OLD_HEX}}}")
    olds = [p for p in folder.parent.iterdir() if shape.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    if not olds:
        return
    olds.sort(key=lambda p: p.stat().st_mtime_ns)
    if not os.path.lexists(folder):
        os.rename(olds.pop(), folder)
        fsync_dir(folder.parent)
    for p in olds:
        _remove_ours(p)


def file_writer(write: Callable[[BinaryIO], Any]) -> Callable[[Path], None]:
    """A ``build`` step writing one file through ``write(f)``, flushed and fsynced."""

    def run(path: Path) -> None:
        with open(path, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    return run


def write_files(folder: str | os.PathLike[str], files: Mapping[str, Callable[[BinaryIO], Any]], *, what: str = "output",
                owned: Callable[[Path], set[str] | None] = lambda _d: set(), overwrite: bool = True) -> None:
    """Write several files into ``folder`` as one unit (all old or all new), keeping the folder's other files.

    ``files`` maps each file name to ``write(f)``. Files of the same names are
    replaced when ``owned(folder)`` lists them or with ``overwrite`` (else a
    :class:`WriteError`); nothing else in the folder is touched.
    """

    def build(tmp: Path) -> None:
        for name, write in files.items():
            file_writer(write)(tmp / name)

    write_folder(folder, list(files), build, owned=owned, overwrite=overwrite, what=what)


def json_bytes(doc: Mapping[str, Any]) -> Callable[[BinaryIO], Any]:
    """A writer of ``doc`` as indented, key-sorted JSON (the library's JSON style)."""
    return lambda f: f.write((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
