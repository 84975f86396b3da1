"""Opening untrusted local files: regular files only, contained derived paths, bounded reads.

Every reader of the library goes through this module, so one rule holds everywhere:

* **Regular files only.** A FIFO, socket, device or folder given as (or found inside) an
  input is a typed :class:`~fvtransform.errors.UnsafeFileError` *before* anything could
  block: the path is ``stat``-ed first, then opened with ``O_NONBLOCK`` (a FIFO swapped
  in after the ``stat`` cannot block the ``open``), and the descriptor is ``fstat``-ed
  and compared with the first ``stat`` (same device and inode), which closes the race.
* **Derived paths are contained.** A path the library derives from a folder (a shard
  named by an index, the weights file or index picked in a model folder, ``config.json``,
  a pipeline component folder, a LoRA file or ``adapter_config.json`` in a LoRA folder)
  must resolve inside that folder, symlinks included. A Hugging Face cache snapshot
  (``<repo>/snapshots/<commit>/...``) may link into its own repo folder (``blobs/``):
  that is the cache's layout. A path the *user* gives explicitly is the user's choice
  and is not contained. :func:`contained` checks the name when it is derived and returns a
  :class:`DerivedPath` that remembers its root; :func:`open_regular` checks it again on
  *what it opened* (the path resolved after the open must lie inside the root and be the
  very file behind the descriptor, same device and inode), so a symlink swapped in between
  the check and the open (a racer renaming links over the file) is refused, never read.
* **Bounded reads.** Small files (JSON) are read with a byte cap.

API (used by io, lora, hub, registry):

* :func:`check_regular` ``(path, what) -> os.stat_result``
* :func:`open_regular` ``(path, what) -> BinaryIO`` (a context manager; blocking mode restored)
* :func:`read_bytes` ``(path, what, limit) -> bytes`` (JSON is parsed from these bytes by :mod:`fvtransform._json`)
* :func:`contained` ``(folder, name, what, source) -> Path``
* :func:`fd_path` ``(fd) -> str``: a name that reopens exactly this descriptor's file
  (``/proc/self/fd/N``), for APIs that take a file name (memory maps, ``torch.load``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
import stat
from typing import TYPE_CHECKING, BinaryIO

from fvtransform.errors import FormatError, NotFoundError, UnsafeFileError

if TYPE_CHECKING:
    import torch

__all__ = ["check_regular", "no_such_path", "open_regular", "read_bytes", "contained", "allowed_root", "fd_path",
           "MAX_JSON_BYTES", "map_checked", "DerivedPath"]

#: The largest JSON file (index, config) read whole into memory.
MAX_JSON_BYTES = 64 * 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symlink"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: Path, what: str, mode: int) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: the {what} is {_kind(mode)}, not a regular file; fvtransform opens regular files only "
        "(reading anything else could block forever or read a device). Pass the path of a real file."
    )


class DerivedPath(type(Path())):  # type: ignore[misc]  # PosixPath (or WindowsPath): pathlib's own subclassing
    """A path found inside a folder, that :func:`open_regular` opens only if what it opens lies inside ``contained_in``.

    Made by :func:`contained` only. It compares, hashes and prints as the plain path; a path
    derived from it (``p / "x"``, ``p.parent``) has no containment root: derive it
    with :func:`contained`, which checks it under the same root.
    """

    __slots__ = ("_fvt_root",)

    @property
    def contained_in(self) -> Path | None:
        """The resolved folder the opened file must lie in (None for a path not made by :func:`contained`)."""
        return getattr(self, "_fvt_root", None)


def _derived(path: Path, root: Path) -> DerivedPath:
    out = DerivedPath(path)
    out._fvt_root = root
    return out


def _root_of(path: object) -> Path | None:
    return path.contained_in if isinstance(path, DerivedPath) else None


def _inside(real: Path, root: Path) -> bool:
    return real == root or root in real.parents


def _check_opened(path: Path, what: str, root: Path, st: os.stat_result) -> None:
    """Containment checked on the file actually opened (``st``: its ``fstat``), not on the name checked before.

    The path is resolved after the open; it must lie inside ``root`` and be the very file
    behind the descriptor (same device and inode). A name swapped for a link between the
    check and the open resolves outside, or to another file, and is refused.
    """
    try:
        real = path.resolve()
        now = os.stat(real)
    except (OSError, RuntimeError):
        now, real = None, path
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise UnsafeFileError(
            f"{path}: the {what} was replaced while it was being opened (its name no longer leads to the file "
            "opened — a link swapped in?); refusing it. Try again once the folder stops changing"
        )
    if not _inside(real, root):
        raise UnsafeFileError(
            f"{path}: the {what} opened resolves to {real}, outside {root}; refusing to read it (it was swapped "
            "for a link after it was checked — a symlink in a folder must stay inside the folder)"
        )


def no_such_path(path: str | os.PathLike[str]) -> NotFoundError:
    """The error for a path the user gave that does not exist: it names the path (a ``~`` is never expanded).

    >>> no_such_path("~/m.safetensors")
    NotFoundError("~/m.safetensors: no such file or folder ('~' is not expanded: pass os.path.expanduser(path))")
    """
    hint = " ('~' is not expanded: pass os.path.expanduser(path))" if os.fspath(path).startswith("~") else ""
    return NotFoundError(f"{path}: no such file or folder{hint}")


def check_regular(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """``stat`` ``path`` (following symlinks) and require a regular file.

    Raises:
        NotFoundError: nothing is there (or a dangling symlink).
        UnsafeFileError: a FIFO, socket, device or folder.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such {what}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, what, st.st_mode)
    return st


def open_regular(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """Open a regular file for binary reading, refusing anything else without blocking.

    The returned file is an ordinary buffered reader (blocking mode restored);
    use it as a context manager. A :class:`DerivedPath` (from :func:`contained`) is
    opened only if the file opened lies inside its root (:func:`_check_opened`).

    Raises:
        NotFoundError: nothing is there.
        UnsafeFileError: not a regular file, replaced while opened, or (a derived path) outside its root.
    """
    root = _root_of(path)
    path = path if isinstance(path, Path) else Path(path)
    first = check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such {what}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot open the {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, st.st_mode)
        if (st.st_dev, st.st_ino) != (first.st_dev, first.st_ino):
            raise UnsafeFileError(f"{path}: the {what} was replaced while it was being opened; try again")
        if root is not None:
            _check_opened(path, what, root, st)
        os.set_blocking(fd, True)
        return io.open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike[str], what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes."""
    path = path if isinstance(path, Path) else Path(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FormatError(f"{path}: the {what} is {size} bytes, over the {limit}-byte limit; it is not a real {what}")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise FormatError(f"{path}: the {what} grew past the {limit}-byte limit while it was read")
    return data


def allowed_root(folder: str | os.PathLike[str]) -> Path:
    """Where paths derived from ``folder`` may resolve: the folder, or a hub cache snapshot's whole repo folder.

    In the huggingface_hub cache, ``<repo>/snapshots/<commit>/x`` is a link to
    ``<repo>/blobs/<hash>``: links into the same repo's cache are its layout.
    """
    real = Path(folder).resolve()
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and len(parts[i + 1]) == 40 and (Path(*parts[:i]) / "blobs").is_dir():
            return Path(*parts[:i])
    return real


def contained(
    folder: str | os.PathLike[str],
    name: object,
    what: str,
    source: str | os.PathLike[str] | None = None,
    *,
    root: Path | None = None,
) -> Path:
    """``folder / name`` for a plain ``name``, refused unless it resolves inside :func:`allowed_root` of ``folder``.

    ``source`` is the file or folder that named the path (for the message). The
    returned path is ``folder / name`` (not resolved), so messages keep the
    user's spelling, as a :class:`DerivedPath` that :func:`open_regular` checks
    again on what it opens. The target need not exist. ``root`` is :func:`allowed_root`
    of ``folder``, when the caller checks many names in one folder. A ``folder``
    that is itself a :class:`DerivedPath` (a pipeline component) must still resolve
    inside its own root.

    Raises:
        UnsafeFileError: ``name`` is not a plain file name (separators, ``..``,
            NUL, empty), or the path resolves (through symlinks) outside.
    """
    parent_root = _root_of(folder)
    folder = folder if isinstance(folder, Path) else Path(folder)
    src = source if source is not None else folder
    if (not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name
            or name != os.path.basename(name) or "/" in name or (os.altsep and os.altsep in name)):
        raise UnsafeFileError(
            f"{src}: {what} name {name!r} is not a plain file name in {folder}; refusing to follow it"
        )
    candidate = folder / name
    root = root if root is not None else allowed_root(folder)
    if parent_root is not None and not _inside(root, parent_root):
        raise UnsafeFileError(
            f"{src}: the folder {folder} now resolves to {root}, outside {parent_root} where it was found; refusing "
            f"to follow {name!r} (a folder swapped for a link after it was checked)"
        )
    try:
        real = candidate.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise UnsafeFileError(f"{src}: {what} {name!r} cannot be resolved ({e}); refusing to follow it") from None
    if not _inside(real, root):
        raise UnsafeFileError(
            f"{src}: {what} {name!r} resolves to {real}, outside {root}; refusing to follow it "
            "(a symlink in a folder must stay inside the folder — pass the target's path yourself if you trust it)"
        )
    return _derived(candidate, root)


def fd_path(fd: int) -> str | None:
    """A file name that opens exactly the file behind ``fd`` (Linux ``/proc/self/fd``), or None where there is none."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else None


def map_checked(path: str | os.PathLike[str], size: int, identity: tuple[int, ...] = ()) -> torch.UntypedStorage:
    """Map a regular file privately (copy-on-write), refusing it unless it is the file its header came from.

    The file is opened and checked (:func:`open_regular`), its size and
    ``identity`` (device, inode, size, mtime in ns, as :class:`Header` records
    them) compared with those its header was validated against, and the
    mapping made from that very descriptor, so a file replaced, rewritten or
    truncated after its header was read is a typed error rather than a crash
    or another file's bytes read with this header. A file truncated *after* it is mapped
    can still make the process fail on touching the lost pages (``SIGBUS``), as
    with every memory map; see docs/security.md.
    """
    import torch

    from fvtransform.errors import IntegrityError

    path = path if isinstance(path, Path) else Path(path)
    with open_regular(path, "safetensors file") as f:
        st = os.fstat(f.fileno())
        if st.st_size != size:
            raise IntegrityError(
                f"{path}: the file is {st.st_size} bytes now but was {size} bytes when its header was read; it changed "
                "while in use (being written or truncated) — load it again once it is complete"
            )
        if identity and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != identity:
            raise IntegrityError(
                f"{path}: the file was replaced or rewritten after its header was read; its tensors would be read "
                "with the old header — load it again"
            )
        # torch's stub types from_file on the storage base class; UntypedStorage.from_file returns an UntypedStorage
        return torch.UntypedStorage.from_file(fd_path(f.fileno()) or str(path), shared=False, nbytes=size)  # type: ignore[return-value]
