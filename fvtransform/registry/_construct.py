"""From an untrusted config to a module class and its constructor's arguments, without running its code.

A config names a class; the registry maps registered names (trusted: the user or the library put them
there) to constructors. A name that is not registered falls back to the class of that name in diffusers
or transformers, and only when :func:`library_class` accepts it: a class, a subclass of ``nn.Module``
and of the library's model base class (``ModelMixin`` / ``PreTrainedModel``), defined in a module of
that library, not an ``Auto*`` class, not a factory (``pipeline``) or a pipeline class. Nothing a config
says is ever imported.

Arguments are made by the library's own rules and nothing else: a diffusers model gets the keys of its
``__init__`` signature through ``from_config``; a transformers model gets its ``config_class`` built by
``from_dict``; another constructor gets the keys its signature names (or every public key when it takes
``**kwargs``). Keys that would load code (``trust_remote_code``, ``custom_pipeline``) are refused;
keys that select code at run time (``auto_map``, ``attn_implementation``, ...) are removed at every
level before the config reaches the library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib
import inspect
import keyword
import re
from typing import Any

from torch import nn

from fvtransform.errors import FormatError, MissingDependencyError, RegistryError, UnsafeFileError
from fvtransform._messages import close_matches

__all__ = ["library_class", "constructor_call", "REFUSED_KEYS", "STRIPPED_KEYS", "check_config_types"]

#: Keys whose only purpose is to load code from a repository: a config holding one is refused.
REFUSED_KEYS: frozenset[str] = frozenset({"trust_remote_code", "custom_pipeline", "custom_revision"})

#: Keys that select code or kernels at run time (remote ``auto_map`` classes, hub attention kernels):
#: removed at every nesting level; fvtransform builds with each library's default implementation.
STRIPPED_KEYS: frozenset[str] = frozenset({
    "auto_map", "attn_implementation", "_attn_implementation", "_attn_implementation_internal",
    "_attn_implementation_autoset", "experts_implementation", "_experts_implementation",
    "_experts_implementation_internal", "kernel_config", "use_kernels",
})

#: Per library: the module prefix, the base class a model must derive from, the config key it comes from.
_LIBRARIES: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "ModelMixin"),
    "transformers": ("transformers", "PreTrainedModel"),
}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")

#: ``AutoModel``, ``AutoModelForCausalLM``, ``AutoPipelineForText2Image``, ``AutoConfig``...: the Auto
#: loaders (which may load code), refused by name. Not ``AutoencoderKL`` and its kin: those are models.
_AUTO = re.compile(r"Auto(?!encoder)[A-Z]")
#: Names that are factories or loaders, refused before any lookup (``Auto*`` loaders by :data:`_AUTO`).
_FACTORIES: frozenset[str] = frozenset({"pipeline", "DiffusionPipeline", "ModelMixin", "PreTrainedModel"})


def _refuse(package: str, name: str, why: str, source: str, key: str) -> RegistryError:
    return RegistryError(
        f"{source}: key {key!r} names {name!r}, which fvtransform will not build from {package}: {why}. "
        f"A config may name only a registered architecture or a model class of diffusers / transformers; "
        f"register your own with fvt.register({name!r}, constructor)."
    )


def library_class(package: str, name: str, *, source: str, key: str, registered: list[str]) -> type[nn.Module]:
    """The model class ``name`` of ``package`` ("diffusers" / "transformers"), checked; never any other object.

    Raises:
        MissingDependencyError: the package is not installed.
        RegistryError: no such class, or ``name`` is not a model class of that library.
    """
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise _refuse(package, name, "not a class name", source, key)
    if _AUTO.match(name) or name in _FACTORIES or name.endswith("Pipeline"):
        raise _refuse(package, name, "an Auto class, a pipeline or a factory, which may load code", source, key)
    try:
        lib = importlib.import_module(package)
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            f"{source}: {name!r} is not registered, and the {package} config it comes from needs the package "
            f"{package!r}. Install it with: pip install 'fvtransform[{package}]'"
        ) from e
    prefix, base_name = _LIBRARIES[package]
    base = getattr(lib, base_name)
    try:
        obj = getattr(lib, name, None)
    except Exception as e:  # a lazy import of the library failed: typed, chained
        raise RegistryError(f"{source}: key {key!r}: {package}.{name} cannot be imported ({type(e).__name__}: {e})") from e
    if obj is None:
        hint = close_matches(name, registered)
        raise RegistryError(
            f"{source}: key {key!r}: unknown architecture {name!r}: not registered and not a class of {package}"
            + (f"; close matches: {hint}" if hint else "")
            + f". Register it with fvt.register({name!r}, constructor)."
        )
    module = getattr(obj, "__module__", "") or ""
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and issubclass(obj, base) and obj is not base):
        raise _refuse(package, name, f"not a {base_name} subclass (found {type(obj).__name__})", source, key)
    if not module.startswith(prefix + "."):
        raise _refuse(package, name, f"defined in {module!r}, not in {prefix}", source, key)
    if package == "transformers":
        config_class = getattr(obj, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, lib.PretrainedConfig)
                and (config_class.__module__ or "").startswith("transformers.")):
            raise _refuse(package, name, "it has no transformers config class", source, key)
    return obj


def check_config_types(config: Mapping[str, Any], *, source: str) -> None:
    """Refuse code-loading keys anywhere in the config, and check the types of the keys that name classes."""
    from fvtransform._json import check_type

    stack: list[tuple[Any, str]] = [(config, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            for k, v in value.items():
                where = f"{path}.{k}" if path else str(k)
                if k in REFUSED_KEYS and v not in (None, False):
                    raise UnsafeFileError(
                        f"{source}: key {where!r} asks to run code from a repository ({v!r:.60}); fvtransform never "
                        "runs code from a config. Remove the key, or build the model yourself and register it."
                    )
                stack.append((v, where))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    if "_class_name" in config:
        check_type(config["_class_name"], str, source=source, key="_class_name")
    if "architectures" in config:
        archs = check_type(config["architectures"], (list, str), source=source, key="architectures")
        for i, a in enumerate([archs] if isinstance(archs, str) else archs):
            check_type(a, str, source=source, key=f"architectures[{i}]")


def _stripped(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _stripped(v) for k, v in value.items() if k not in STRIPPED_KEYS}
    if isinstance(value, list):
        return [_stripped(v) for v in value]
    return value


def _is_diffusers_model(ctor: Any) -> bool:
    return isinstance(ctor, type) and any(
        c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers.") for c in ctor.__mro__
    )


def _is_transformers_model(ctor: Any) -> bool:
    return isinstance(ctor, type) and any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in ctor.__mro__
    )


def _init_keys(ctor: Any) -> tuple[set[str], bool]:
    """The keyword names a constructor takes, and whether it takes ``**kwargs``."""
    target = getattr(ctor, "__init__") if isinstance(ctor, type) else ctor  # a class's own __init__, self included
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def constructor_call(ctor: Any, config: Mapping[str, Any], *, source: str) -> Callable[[], nn.Module]:
    """A zero-argument callable that builds ``ctor`` from ``config`` by the library's own rules.

    The arguments are computed here (outside any build budget); the returned callable only constructs.
    """
    config = _stripped(config)
    if _is_diffusers_model(ctor):
        keys, _ = _init_keys(ctor)
        keys = (keys | set(getattr(ctor, "_deprecated_kwargs", []) or [])) - set(getattr(ctor, "ignore_for_config", []) or [])
        init = {k: v for k, v in config.items() if k in keys and not k.startswith("_")}
        return lambda: ctor.from_config(init)
    if _is_transformers_model(ctor):
        config_class = ctor.config_class
        public = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}

        def make() -> nn.Module:
            return ctor(config_class.from_dict(public))

        return make
    keys, var_kw = _init_keys(ctor)
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(public) - keys) if not var_kw else []
    if unknown:
        raise FormatError(
            f"{source}: key {unknown[0]!r} is not a parameter of {getattr(ctor, '__name__', ctor)!r} "
            f"(unknown keys: {unknown}; it takes {sorted(keys)}). Fix the config or the registered constructor."
        )
    return lambda: ctor(**public)
