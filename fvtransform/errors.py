"""The exception hierarchy of fvtransform.

Every error the library raises derives from :class:`FvTransformError`. Each
subclass names a category, so callers can catch what they can handle::

    >>> import fvtransform as fvt
    >>> issubclass(fvt.errors.KeyMismatchError, fvt.errors.FvTransformError)
    True

Messages follow one shape: what was expected, what was found, and the fix.

Each class has one meaning. Where a value came from decides between two of them: a
caller's own argument that is wrong is a :class:`UsageError`; the same value read
from a file, config or server answer is a :class:`FormatError` (or, for a server,
:class:`HubError` / :class:`IntegrityError`).
"""

from __future__ import annotations

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
]


class FvTransformError(Exception):
    """Base of every error raised by fvtransform; never raised itself, catch it to catch them all."""


class KeyMismatchError(FvTransformError, KeyError):
    """Keys are missing, unexpected, duplicated or unmatched between two sides that must agree.

    Example: ``fvt.select(tree, "blocks.9.*")`` where no key matches, or a checkpoint lacks a key
    the model expects. Not for a key that is spelled wrongly inside a file's header (FormatError).
    """

    def __str__(self) -> str:  # KeyError quotes its message; we do not.
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(FvTransformError, ValueError):
    """A tensor has a shape (or dtype) other than the one required.

    Example: a LoRA ``B @ A`` of shape [64, 32] for a [64, 64] weight. Not for a header whose
    declared shape disagrees with its own byte count (FormatError).
    """


class FormatError(FvTransformError, ValueError):
    """A file or mapping from outside (checkpoint, LoRA file, config, index) is not in the format it claims.

    Example: a safetensors header whose ``data_offsets`` run past the end of the file, or a PEFT
    config whose ``r`` is ``"eight"``. Not for the caller's own arguments (UsageError) nor for a
    hub server's answers (HubError / IntegrityError).
    """


class NotFoundError(FvTransformError, FileNotFoundError):
    """A file, folder, component, repository or revision does not exist.

    Example: ``fvt.load("missing.safetensors")``. Not for a key missing from a tree (KeyMismatchError).
    """


class RegistryError(FvTransformError, LookupError):
    """A registry name is unknown, taken, or cannot be imported.

    Example: ``fvt.build("NoSuchModel", {})``. Not for a config that names a known class with
    bad values (FormatError).
    """


class ImmutableError(FvTransformError, TypeError):
    """An attempt to mutate an immutable value (a ParamTree, an adapter, a record).

    Example: ``tree["w"] = t`` or ``del tree["w"]``. Not for an argument that asks for an
    in-place operation the value cannot allow (UsageError).
    """


class PlanError(FvTransformError, ValueError):
    """A plan (rename, fuse, shard, LoRA resolution) is inconsistent in itself.

    Example: a fuse rule with one source, or a shard plan with two placements for a 1-D mesh.
    Not for a plan argument of the wrong type (UsageError).
    """


class MissingDependencyError(FvTransformError, ImportError):
    """An optional package is needed; the message names the extra to install.

    Example: building a diffusers model without ``diffusers`` installed. Not for a broken import
    path in a registry entry (RegistryError).
    """


class UnsafeFileError(FvTransformError):
    """A file would run code or escape its folder (pickle, path traversal, links).

    Example: loading a ``.bin`` pickle without ``allow_pickle=True``, or an index naming
    ``../x.safetensors``. Not for a file that is merely malformed (FormatError).
    """


class IntegrityError(FvTransformError):
    """A file's bytes do not match what its header or its source promised.

    Example: a downloaded file whose sha256 differs from the hub's. Not for a header that is
    malformed in itself (FormatError).
    """


class HubError(FvTransformError):
    """A download failed or the hub answered something no hub sends; the message keeps repository and revision.

    Example: a network error, or a listing with a 39-hex commit. Not for a repository or revision
    that does not exist (NotFoundError).
    """


class NumericError(FvTransformError, ValueError):
    """A tensor (or a LoRA scale) holds NaN or Inf where finite values are required.

    Example: merging a LoRA whose factors hold NaN. Not for a finite number out of range
    (FormatError when read from a file, UsageError when passed as an argument).
    """


class WriteError(FvTransformError, OSError):
    """A destination cannot or may not be written (full disk, read-only, not ours, busy); the old data is intact.

    Example: saving into a read-only folder. Not for an output path the caller chose badly, such
    as one that is also an input (UsageError).
    """


class UsageError(FvTransformError, TypeError, ValueError):
    """The API was called the wrong way; the message shows the right call.

    Example: ``fvt.lora.extract(base, tuned, rank=-1)``, ``format="nope"``, both or neither of two
    exclusive arguments, a factory called like an eager function. Not for a bad file (FormatError).
    """
