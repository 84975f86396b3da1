"""Running modules on trees with ``torch.func.functional_call``."""

from fvtransform.call._call import call, call_with_buffers

__all__ = ["call", "call_with_buffers"]
