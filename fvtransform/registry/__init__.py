"""Architecture registry: names -> module constructors, built on the meta device."""

from fvtransform.registry._builtins import BUILTIN_ENTRIES, install_builtins
from fvtransform.registry._budget import DEFAULT_BUILD_LIMITS, BuildLimits
from fvtransform.registry._layouts import LAYOUTS, Layout, layout, layout_names
from fvtransform.registry._registry import REGISTRY, Registry, build, meta_parameters, register, resolve

install_builtins(REGISTRY)

__all__ = ["BUILTIN_ENTRIES", "BuildLimits", "DEFAULT_BUILD_LIMITS", "LAYOUTS", "Layout", "REGISTRY", "Registry", "build",
           "install_builtins", "layout", "layout_names", "meta_parameters", "register", "resolve"]
