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
    drop,
    map_tensors,
    partition,
    rename,
    select,
    tensors_equal,
    to,
    update,
)

__version__ = "0.1.0"

_LAZY = {"shard": "fvtransform.distributed", "unshard": "fvtransform.distributed", "distributed": None}


def __getattr__(name: str) -> object:
    """``fvt.shard``, ``fvt.unshard`` and ``fvt.distributed`` import torch.distributed.tensor on first use."""
    if name in _LAZY:
        import importlib

        mod = importlib.import_module("fvtransform.distributed")
        return mod if name == "distributed" else getattr(mod, name)
    raise AttributeError(f"module 'fvtransform' has no attribute {name!r}")

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
