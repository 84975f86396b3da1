"""fvtransform: pure, composable weight transforms for large (video) diffusion models.

Trees of parameters are immutable values; every operation returns a new tree
and shares the tensors it did not change. Models run on trees through
:func:`call` (``torch.func.functional_call``, strictly).

>>> import torch, fvtransform as fvt
>>> model = fvt.build("fvt-video-dit", device="cpu")
>>> tree = fvt.ParamTree.from_module(model)
>>> x = torch.randn(1, 4, 2, 4, 4)
>>> out = fvt.call(model, tree, x, torch.tensor([5]), torch.randn(1, 3, 16))
>>> out.shape
torch.Size([1, 4, 2, 4, 4])
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # what the names are, for type checkers; at run time each is imported on first use
    from fvtransform import errors, hub, io, lora, models, registry, transforms, tree
    from fvtransform._call import bind, call, call_with_buffers
    from fvtransform.io import CheckReport, check, load, load_model, load_pipeline, save
    from fvtransform.registry import REGISTRY, Registry, build, register, resolve
    from fvtransform.transforms import Transform, chain
    from fvtransform.tree import (
        Fuse,
        KeyMap,
        MappingPlan,
        ParamTree,
        Rename,
        Split,
        cast,
        combine,
        dequantize,
        drop,
        map_tensors,
        partition,
        quantize_fp8,
        rename,
        select,
        tensors_equal,
        to,
        update,
    )

__version__ = "0.1.0"

#: The submodules ``fvt.X`` names, and the module each other public name comes from: imported on first use,
#: so that ``import fvtransform`` alone (and so ``fvtransform --help``) does not import torch.
_SUBMODULES = frozenset({"errors", "hub", "io", "lora", "models", "registry", "transforms", "tree", "distributed"})
_FROM = {
    **dict.fromkeys(["bind", "call", "call_with_buffers"], "fvtransform._call"),
    **dict.fromkeys(["CheckReport", "check", "load", "load_model", "load_pipeline", "save"], "fvtransform.io"),
    **dict.fromkeys(["REGISTRY", "Registry", "build", "register", "resolve"], "fvtransform.registry"),
    **dict.fromkeys(["Transform", "chain"], "fvtransform.transforms"),
    **dict.fromkeys(["Fuse", "KeyMap", "MappingPlan", "ParamTree", "Rename", "Split", "cast", "combine", "dequantize",
                     "drop", "map_tensors", "partition", "quantize_fp8", "rename", "select", "tensors_equal", "to", "update"], "fvtransform.tree"),
    # fvt.shard, fvt.unshard and fvt.distributed import torch.distributed.tensor on first use
    **dict.fromkeys(["shard", "unshard"], "fvtransform.distributed"),
}


def __getattr__(name: str) -> object:
    """A public name, imported on first use (then kept as a plain attribute)."""
    if name in _SUBMODULES:
        return _importlib.import_module(f"fvtransform.{name}")
    if name in _FROM:
        value = getattr(_importlib.import_module(_FROM[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fvtransform' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CheckReport",
    "Fuse",
    "KeyMap",
    "MappingPlan",
    "REGISTRY",
    "ParamTree",
    "Registry",
    "Rename",
    "Split",
    "Transform",
    "__version__",
    "bind",
    "build",
    "call",
    "call_with_buffers",
    "cast",
    "chain",
    "combine",
    "dequantize",
    "distributed",
    "drop",
    "check",
    "errors",
    "hub",
    "io",
    "load",
    "load_model",
    "load_pipeline",
    "lora",
    "save",
    "map_tensors",
    "models",
    "partition",
    "quantize_fp8",
    "register",
    "registry",
    "rename",
    "resolve",
    "select",
    "shard",
    "tensors_equal",
    "to",
    "transforms",
    "tree",
    "unshard",
    "update",
]
