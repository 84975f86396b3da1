"""Running modules on trees with ``torch.func.functional_call``."""

from fvtransform.call._bind import bind
from fvtransform.call._call import call, call_with_buffers, check_keys

__all__ = ["bind", "call", "call_with_buffers", "check_keys"]
