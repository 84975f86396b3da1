"""Sharding on torch.distributed: plans as values, shard / unshard, sharded loading.

>>> from fvtransform.distributed import fsdp_plan
>>> import torch
>>> fsdp_plan().bytes_per_rank({"w": torch.empty(5, 4), "s": torch.empty(())}, mesh_shape=(2,))
[52, 36]
"""

from fvtransform import _unlisted
from fvtransform.distributed._plan import ResolvedPlan, ShardPlan, fsdp_plan, tp_plan
from fvtransform.distributed._shard import shard, unshard

__all__ = ["ResolvedPlan", "ShardPlan", "fsdp_plan", "shard", "tp_plan", "unshard"]

__getattr__ = _unlisted.module_getattr("distributed")  # a name this module no longer lists shows the public way
