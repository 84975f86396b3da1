"""Running modules on trees with ``torch.func.functional_call``."""

from fvtransform import _unlisted
from fvtransform.call._bind import bind
from fvtransform.call._call import call, call_with_buffers

__all__ = ["bind", "call", "call_with_buffers"]

__getattr__ = _unlisted.module_getattr("call")  # a name this module no longer lists shows the public way
