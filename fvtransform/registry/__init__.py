"""Architecture registry: names -> module constructors, built on the meta device."""

from fvtransform import _unlisted
from fvtransform.registry import _builtins
from fvtransform.registry._budget import BuildLimits
from fvtransform.registry._layouts import LAYOUTS, Layout, layout, layout_names
from fvtransform.registry._registry import REGISTRY, Registry, build, meta_parameters, register, resolve

_builtins.install_builtins(REGISTRY)

__all__ = ["BuildLimits", "LAYOUTS", "Layout", "REGISTRY", "Registry", "build", "layout", "layout_names", "meta_parameters",
           "register", "resolve"]

__getattr__ = _unlisted.module_getattr("registry")  # a name this module no longer lists shows the public way
