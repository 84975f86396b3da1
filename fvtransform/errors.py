"""The exception hierarchy of fvtransform.

Every error the library raises derives from :class:`FvTransformError`. Each
subclass names a category, so callers can catch what they can handle::

    >>> import fvtransform as fvt
    >>> issubclass(fvt.errors.KeyMismatchError, fvt.errors.FvTransformError)
    True

Messages follow one shape: what was expected, what was found, and the fix.
"""

from __future__ import annotations

import difflib as _difflib
import typing as _typing

if _typing.TYPE_CHECKING:  # annotations only: the module's public names are exactly __all__
    from collections.abc import Iterable

__all__ = [
    "FvTransformError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "FormatError",
    "NotFoundError",
    "RegistryError",
    "ImmutableError",
    "PlanError",
    "MissingDependencyError",
    "UnsafeFileError",
    "IntegrityError",
    "HubError",
    "NumericError",
    "WriteError",
    "UsageError",
    "close_matches",
    "format_keys",
]


class FvTransformError(Exception):
    """Base of every error raised by fvtransform."""


class KeyMismatchError(FvTransformError, KeyError):
    """Keys are missing, unexpected, duplicated or unmatched."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not.
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(FvTransformError, ValueError):
    """A tensor has a shape (or dtype) other than the one required."""


class FormatError(FvTransformError, ValueError):
    """A file or mapping is not in the format it claims or that was asked for."""


class NotFoundError(FvTransformError, FileNotFoundError):
    """A file, folder, component, repository or revision does not exist."""


class RegistryError(FvTransformError, LookupError):
    """A registry name is unknown, taken, or cannot be imported."""


class ImmutableError(FvTransformError, TypeError):
    """An attempt to mutate an immutable value (a ParamTree, an adapter)."""


class PlanError(FvTransformError, ValueError):
    """A plan (rename, fuse, shard, LoRA resolution) is inconsistent."""


class MissingDependencyError(FvTransformError, ImportError):
    """An optional package is needed; the message names the extra to install."""


class UnsafeFileError(FvTransformError):
    """A file would run code or escape its folder (pickle, path traversal)."""


class IntegrityError(FvTransformError):
    """A file's bytes do not match what its header or its source promised."""


class HubError(FvTransformError):
    """A download failed; the message keeps the repository and revision."""


class NumericError(FvTransformError, ValueError):
    """A tensor holds NaN or Inf where finite values are required."""


class WriteError(FvTransformError, OSError):
    """A destination cannot or may not be written (full disk, read-only, not ours, busy); the old data is intact."""


class UsageError(FvTransformError, TypeError):
    """The API was called the wrong way; the message shows the right call."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (best first).

    >>> close_matches("blocks.0.attn1.to_qq", ["blocks.0.attn1.to_q", "x"])
    ['blocks.0.attn1.to_q']
    """
    return _difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Format a list of keys for an error message, sorted, eliding a long tail.

    >>> format_keys(["b", "a"])
    "['a', 'b']"
    >>> format_keys([str(i) for i in range(20)], limit=2)
    "['0', '1', ... (18 more)]"
    """
    items = sorted(keys)
    if len(items) <= limit:
        return repr(items)
    shown = ", ".join(repr(k) for k in items[:limit])
    return f"[{shown}, ... ({len(items) - limit} more)]"
