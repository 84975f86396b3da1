"""Names that left the public surface (issue 20, a smaller surface): looking one up names the public way.

Each public module whose internals were once listed installs :func:`module_getattr` as its ``__getattr__``:
``fvt.io.read_header`` is then an error that shows the call to make (``fvt.io.open_checkpoint(path)``), or
says the name is internal. Nothing here returns the old object: there is one spelling per operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from fvtransform.errors import UsageError

__all__ = ["UNLISTED", "module_getattr"]

_HEADERS = "fvt.io.open_checkpoint(path) reads the headers (no tensor bytes): .keys(), .info(key), .metadata()"
_FILES = "fvt.io.open_checkpoint(path) finds and checks a checkpoint's files; fvt.load(path) loads them"

#: Public module (below ``fvtransform``) -> a name it no longer lists -> the public way to do what it did.
UNLISTED: dict[str, dict[str, str]] = {
    "io": {
        "Header": _HEADERS,
        "read_header": _HEADERS,
        "WeightFiles": _FILES,
        "find_weight_files": _FILES,
        "read_index": _FILES,
        "parse_size": "fvt.save(tree, path, max_shard_size='5GB') takes the size as text",
    },
    "tree": {
        "matcher": "fvt.select(tree, pattern) and fvt.partition(tree, pattern) match keys against a Pattern",
        "state_keys": "fvt.check(tree, module) compares a tree with a module's state keys",
    },
    "transforms": {
        "as_transform": "fvt.chain(fn, ...) takes any callable tree -> tree as a step",
        "merge": "the LoRA merge step is fvt.transforms.merge_lora(adapters, scale)",
        "unmerge": "the LoRA unmerge step is fvt.transforms.unmerge_lora(adapters, scale)",
    },
    "registry": {
        "BUILTIN_ENTRIES": "fvt.REGISTRY.names() lists the registered architectures, the built-in ones included",
        "install_builtins": "fvt.REGISTRY holds the built-in architectures already",
        "DEFAULT_BUILD_LIMITS": "fvt.registry.BuildLimits() holds the default limits; pass limits= to fvt.build",
    },
    "distributed": {
        "get_plan": "pass plan='fsdp', 'tp' or a ShardPlan to fvt.shard(tree, mesh, plan) or fvt.load(path, mesh=, plan=)",
        "chunk_range": "fvt.shard(tree, mesh, plan) slices each tensor; ShardPlan.bytes_per_rank(...) sizes the slices",
    },
}


class _UnlistedError(UsageError, AttributeError):
    """A name looked up that the module no longer lists (an AttributeError, so ``hasattr`` stays False)."""


def module_getattr(path: str) -> Callable[[str], NoReturn]:
    """The ``__getattr__`` of ``fvtransform.<path>``: an unlisted name shows its public way; others are not there.

    >>> getattr_ = module_getattr("io")
    >>> getattr_("read_header")
    Traceback (most recent call last):
    ...
    fvtransform._unlisted._UnlistedError: fvtransform.io.read_header is internal, not public; the public way: fvt.io.open_checkpoint(path) reads the headers (no tensor bytes): .keys(), .info(key), .metadata()
    """
    table = UNLISTED[path]

    def __getattr__(name: str) -> NoReturn:
        way = table.get(name)
        if way is not None:
            raise _UnlistedError(f"fvtransform.{path}.{name} is internal, not public; the public way: {way}")
        raise AttributeError(f"module 'fvtransform.{path}' has no attribute {name!r}")

    return __getattr__
