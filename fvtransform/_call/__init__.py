"""Running modules on trees with ``torch.func.functional_call``."""

from fvtransform._call._bind import bind
from fvtransform._call._call import call, call_with_buffers

__all__ = ["bind", "call", "call_with_buffers"]
