"""The architecture registry: names -> module constructors, built on meta.

The registry is the library's one piece of global state, and it is explicit:
:data:`REGISTRY` is a :class:`Registry` value that ``register`` adds to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib
import os
import re
from typing import Any, TypeVar, Union, overload

import torch
from torch import nn

from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform._messages import close_matches
from fvtransform.errors import FormatError, FvTransformError, MissingDependencyError, RegistryError, UsageError
from fvtransform.registry._budget import DEFAULT_BUILD_LIMITS, BuildLimits, budgeted, meta_parameters
from fvtransform.registry._construct import check_config_types, constructor_call, library_class

__all__ = ["Registry", "REGISTRY", "register", "resolve", "build", "Constructor", "meta_parameters", "BuildLimits",
           "DEFAULT_BUILD_LIMITS"]

Constructor = Callable[..., nn.Module]
Target = Union[Constructor, str]

#: The extra that installs each optional package the registry can import.
_EXTRAS = {"diffusers": "diffusers", "transformers": "transformers", "peft": "peft"}


def _import_target(spec: str, *, name: str) -> Constructor:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(
            f"registry entry {name!r}: {spec!r} is not of the form 'package.module:Attr'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        if e.name == top and top in _EXTRAS:  # the extra itself is missing, not a module inside it
            raise MissingDependencyError(
                f"registry entry {name!r} needs the package {top!r}, which is not installed. "
                f"Install it with: pip install 'fvtransform[{_EXTRAS[top]}]'"
            ) from e
        raise RegistryError(f"registry entry {name!r}: cannot import {module_name!r}: {e}") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise RegistryError(
            f"registry entry {name!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None
    if not callable(obj):
        raise RegistryError(f"registry entry {name!r}: {spec!r} is not callable")
    return obj


class Registry:
    """A mapping of names to module constructors (objects or lazy import strings).

    >>> reg = Registry()
    >>> reg.register("linear", "torch.nn:Linear")
    >>> reg.resolve("linear")
    <class 'torch.nn.modules.linear.Linear'>
    >>> reg.resolve("linaer")
    Traceback (most recent call last):
    ...
    fvtransform.errors.RegistryError: unknown architecture 'linaer'; close matches: ['linear']. Register it with fvt.register('linaer', constructor).
    """

    def __init__(self, entries: Mapping[str, Target] | None = None) -> None:
        self._entries: dict[str, Target] = dict(entries or {})

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, constructor: Target, *, override: bool = False) -> None:
        """Add ``name``; a taken name is refused unless ``override=True``."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"a registry name is a non-empty str; found {name!r}")
        if not (callable(constructor) or isinstance(constructor, str)):
            raise RegistryError(
                f"registry entry {name!r}: expected a callable or a 'package.module:Attr' string, "
                f"found {type(constructor).__name__}"
            )
        if name in self._entries and not override:
            raise RegistryError(
                f"registry name {name!r} is taken (by {self._entries[name]!r}); "
                "pass override=True to replace it"
            )
        self._entries[name] = constructor

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugins that clean up)."""
        if name not in self._entries:
            raise RegistryError(f"registry name {name!r} is not registered")
        del self._entries[name]

    def lookup(self, name: str) -> Constructor | None:
        target = self._entries.get(name)
        if target is None:
            return None
        if isinstance(target, str):
            return _import_target(target, name=name)
        return target

    def resolve(self, name_or_config: str | Mapping[str, object], *, source: str | None = None) -> Constructor:
        """The constructor for a name or a diffusers / transformers config dict.

        ``source`` (the config's file) is named in errors. A config never makes anything but a
        registered constructor or a checked model class of diffusers / transformers
        (:func:`~fvtransform.registry._construct.library_class`).
        """
        if isinstance(name_or_config, str):
            found = self.lookup(name_or_config)
            if found is None:
                raise self._unknown(name_or_config)
            return found
        if not isinstance(name_or_config, Mapping):
            raise UsageError(
                f"resolve takes a name or a config dict; found {type(name_or_config).__name__}"
            )
        config: Mapping[str, Any] = name_or_config  # JSON values, their types checked by check_config_types next
        src = source or "config"
        check_config_types(config, source=src)
        if "_class_name" in config:
            name = config["_class_name"]
            found = self.lookup(name)
            if found is not None:
                return found
            return library_class("diffusers", name, source=src, key="_class_name", registered=self.names())
        if "architectures" in config:
            archs = config["architectures"] or []
            if isinstance(archs, str):
                archs = [archs]
            for name in archs:
                found = self.lookup(name)
                if found is not None:
                    return found
            errors = []
            for i, name in enumerate(archs):
                try:
                    return library_class("transformers", name, source=src, key=f"architectures[{i}]",
                                         registered=self.names())
                except MissingDependencyError:
                    raise
                except RegistryError as e:
                    errors.append(str(e).removeprefix(f"{src}: "))
            raise RegistryError(
                f"{src}: no architecture of {list(archs)} is registered or found in transformers"
                + (": " + "; ".join(errors) if errors else "")
            )
        raise FormatError(
            f"{src} has neither '_class_name' (diffusers) nor 'architectures' (transformers); "
            "pass the architecture name explicitly: fvt.build(name, config)"
        )

    def _unknown(self, name: str) -> RegistryError:
        from fvtransform.registry._layouts import LAYOUTS

        hint = close_matches(name, self._entries)
        layouts = close_matches(name, LAYOUTS)
        return RegistryError(
            f"unknown architecture {name!r}"
            + (f"; close matches: {hint}" if hint else f"; {len(self._entries)} names are registered")
            + (f"; checkpoint layouts of that name: {layouts} (a layout is loaded, not built: "
               "fvt.load_model(file, config=..., layout=...))" if layouts else "")
            + f". Register it with fvt.register({name!r}, constructor)."
        )


#: The default registry (the one explicit piece of global state).
REGISTRY = Registry()
"""The process's registry: what ``fvt.register`` adds to and ``fvt.build`` / ``fvt.resolve`` read (the built-in architectures included)."""


#: A constructor (or lazy import string) as given to :func:`register`, returned unchanged.
T = TypeVar("T", bound=Target)


@overload
def register(
    name: str, constructor: None = None, *, override: bool = False, registry: Registry | None = None
) -> Callable[[T], T]: ...
@overload
def register(name: str, constructor: T, *, override: bool = False, registry: Registry | None = None) -> T: ...
def register(
    name: str, constructor: T | None = None, *, override: bool = False, registry: Registry | None = None
) -> T | Callable[[T], T]:
    """Register a constructor under ``name``; also a decorator.

    >>> import torch, fvtransform as fvt
    >>> @fvt.register("doc-mlp", override=True)
    ... class MLP(torch.nn.Module):
    ...     def __init__(self, dim: int = 4):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(dim, dim)
    >>> fvt.build("doc-mlp", {"dim": 8}).fc.weight.shape
    torch.Size([8, 8])
    """
    reg = registry if registry is not None else REGISTRY
    if constructor is None:

        def decorate(obj: T) -> T:
            reg.register(name, obj, override=override)
            return obj

        return decorate
    reg.register(name, constructor, override=override)
    return constructor


def resolve(
    name_or_config: str | Mapping[str, object], *, registry: Registry | None = None, source: str | None = None
) -> Constructor:
    """The constructor for a name, or for a diffusers / transformers config dict.

    A diffusers config resolves by ``_class_name``, a transformers config by
    the first resolvable entry of ``architectures``; names not registered fall
    back to the model class of the same name in diffusers / transformers: only
    a subclass of ``ModelMixin`` / ``PreTrainedModel`` defined there, never an
    ``Auto*`` class, a pipeline or any other callable. ``source`` names the
    config's file in errors.

    >>> import fvtransform as fvt
    >>> fvt.resolve("fvt-video-dit").__name__
    'VideoDiT'
    """
    return (registry if registry is not None else REGISTRY).resolve(name_or_config, source=source)


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise UsageError(f"config must be a dict; found {type(config).__name__}")


#: Config keys that usually count repeated work (layers, blocks): named first when the module budget trips.
_COUNT_KEY = re.compile(r"layers?|blocks?|depth|num_|stages?|experts?", re.IGNORECASE)


def _suspects(config: Mapping[str, Any]) -> Callable[[str], str]:
    """For a budget error: the config keys whose values most likely drive that kind of work."""

    def numbers() -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        stack: list[tuple[Any, str]] = [(config, "")]
        while stack and len(out) < 10_000:
            value, path = stack.pop()
            if isinstance(value, Mapping):
                stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
            elif isinstance(value, list):
                stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value[:1000]))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((path, value))
        return out

    def describe(kind: str) -> str:
        found = numbers()
        if kind == "modules":
            found.sort(key=lambda kv: (not _COUNT_KEY.search(kv[0]), -kv[1]))
        else:
            found.sort(key=lambda kv: -kv[1])
        if not found:
            return ". Fix: check the config, or raise the limit with limits=fvt.registry.BuildLimits(...)"
        shown = ", ".join(f"{k!r}: {v!r}" for k, v in found[:3])
        return (f". The config values that most likely drive it: {shown}. Fix: check these keys, or raise the limit "
                "with limits=fvt.registry.BuildLimits(...)")

    return describe


def build(
    name_or_config: str | Mapping[str, object],
    config: Mapping[str, object] | None = None,
    *,
    device: torch.device | str = "meta",
    dtype: DTypeLike | None = None,
    registry: Registry | None = None,
    limits: BuildLimits | None = None,
    source: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a module; on the meta device (the default) no parameter memory is used.

    ``name_or_config`` is a registered name (with ``config``) or a config dict
    that names its class. On ``device="meta"`` the parameters are meta tensors
    while non-persistent buffers are computed for real, so the module runs once
    a tree is bound with :func:`fvtransform.call`. Persistent buffers are left
    on meta: they come from the checkpoint.

    A config is untrusted: it can name only a registered constructor or a
    model class of diffusers / transformers, never loads code, and building is
    bounded by ``limits`` (default ``BuildLimits()``, :class:`~fvtransform.registry.BuildLimits`:
    modules, time and real memory, the last two on meta only); exceeding one
    raises :class:`~fvtransform.errors.FormatError` naming the config keys that
    most likely drive the work. ``source`` (the config's file) is named in errors.

    >>> import fvtransform as fvt
    >>> m = fvt.build("fvt-video-dit")
    >>> next(m.parameters()).device
    device(type='meta')
    """
    dtype = None if dtype is None else as_dtype(dtype)
    src = str(source) if source is not None else "config"
    if isinstance(name_or_config, Mapping):
        if config is not None:
            raise UsageError("pass either a config dict or a name and a config, not a config and a config")
        cfg = _config_dict(name_or_config)
    else:
        cfg = _config_dict(config)
        check_config_types(cfg, source=src)
    ctor = resolve(name_or_config, registry=registry, source=src)
    call = constructor_call(ctor, cfg, source=src)
    dev = torch.device(device)
    name = getattr(ctor, "__name__", repr(ctor))
    budget = budgeted(limits or DEFAULT_BUILD_LIMITS, meta=dev.type == "meta",
                      what=f"{src}: building {name}", suspects=_suspects(cfg))
    try:
        if dev.type == "meta":
            with budget:  # parameters go to meta in this thread, as in meta_parameters()
                module = call()
            _persistent_buffers_to_meta(module)
        else:
            with budget, torch.device(dev):
                module = call()
    except FvTransformError:
        raise
    except Exception as e:  # a constructor's own error: typed, chained, with the file
        raise FormatError(
            f"{src}: building {name} failed: {type(e).__name__}: {str(e)[:500]}. Fix: check the config's values "
            "against the class's parameters."
        ) from e
    if not isinstance(module, nn.Module):
        raise RegistryError(f"constructor {ctor!r} returned {type(module).__name__}, not an nn.Module")
    if dtype is not None:
        module = module.to(dtype)
    return module


def _persistent_buffers_to_meta(module: nn.Module) -> None:
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and name not in mod._non_persistent_buffers_set and buf.device.type != "meta":
                mod._buffers[name] = buf.to("meta")
        for name, param in list(mod._parameters.items()):
            if param is not None and param.device.type != "meta":
                mod._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
