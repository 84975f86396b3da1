"""``fvt.load_pipeline``: a diffusers pipeline folder or repo id -> an immutable mapping of its components.

Every weight-bearing component (transformer(s), text encoder(s), image encoder, VAE) is loaded by
:func:`fvtransform.load_model`, so each is built on meta by the registry, matched strictly and cast as
its own library casts it (float32 kept where the class declares it). The rest of the pipeline
(scheduler, tokenizer, feature extractor) is kept as :class:`PipelineEntry` values: library, class and
folder, never loaded. Decisions where the issue is silent, and why:

- A component is weight-bearing when its class is a ``torch.nn.Module`` of diffusers or transformers, or
  when its folder holds ``config.json`` (the model folder of any other library, which the registry must
  then resolve or refuse). Anything else is an entry.
- ``components=[...]`` names exactly what is read and, for a repo id, downloaded (model entries and
  other entries alike, e.g. ``["transformer", "scheduler"]``); ``None`` is every non-null component.
- ``dtypes`` overrides ``dtype`` per component; a key that names no loaded model component is a
  :class:`UsageError` (a typo would otherwise load silently in the wrong dtype).
- An error while loading one component is re-raised as its own class, prefixed with the pipeline
  folder and the component, so the message says which folder to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import importlib
import os
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import attrs
import torch
from torch import nn

from fvtransform._args import check_device, check_strict
from fvtransform._dtypes import DTypeLike, as_dtype
from fvtransform._messages import close_matches
from fvtransform.errors import FormatError, FvTransformError, ImmutableError, NotFoundError, UsageError
from fvtransform.io._declared import LoadedModel
from fvtransform.io._model import load_model, read_json
from fvtransform.io._open import contained
from fvtransform.io._pipeline import MODEL_INDEX, read_pipeline_index, require_components

__all__ = ["Pipeline", "PipelineEntry", "load_pipeline"]

#: Libraries whose classes are looked up to tell a model component from a scheduler or tokenizer.
_MODEL_LIBRARIES = ("diffusers", "transformers")


@attrs.frozen
class PipelineEntry:
    """A component that holds no weights (scheduler, tokenizer, feature extractor): where it is, not loaded.

    ``folder`` is the component's folder (``None`` when the pipeline does not ship one);
    ``library`` and ``class_name`` are its ``model_index.json`` entry, for the caller to build it:
    ``FlowMatchEulerDiscreteScheduler.from_pretrained(entry.folder)``.
    """

    name: str
    library: str
    class_name: str
    folder: Path | None


class Pipeline(Mapping[str, LoadedModel]):
    """What :func:`load_pipeline` returns: component name -> :class:`~fvtransform.io.LoadedModel` (``module, tree``).

    Only weight-bearing components are keys (``pipe["transformer"].tree``); the other components are in
    :attr:`entries`, the index's own fields (``_class_name``, ``boundary_ratio``) in :attr:`config`, and
    the pipeline folder is :attr:`folder`. The value is immutable (its mappings are read-only views, its
    attributes cannot be set); the trees in it are immutable too.
    """

    __slots__ = ("_models", "config", "entries", "folder")

    _models: Mapping[str, LoadedModel]
    folder: Path
    entries: Mapping[str, PipelineEntry]
    config: Mapping[str, object]

    def __init__(self, models: Mapping[str, LoadedModel], *, folder: Path, entries: Mapping[str, PipelineEntry],
                 config: Mapping[str, object]) -> None:
        object.__setattr__(self, "_models", MappingProxyType(dict(models)))
        object.__setattr__(self, "folder", folder)
        object.__setattr__(self, "entries", MappingProxyType(dict(entries)))
        object.__setattr__(self, "config", MappingProxyType(dict(config)))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise ImmutableError(f"a Pipeline is immutable; cannot set {name!r}. Fix: load again, or keep your own dict "
                             "of the trees you change (each transform returns a new tree)")

    def __delattr__(self, name: str) -> NoReturn:
        raise ImmutableError(f"a Pipeline is immutable; cannot delete {name!r}")

    def __getitem__(self, name: str) -> LoadedModel:
        try:
            return self._models[name]
        except KeyError:
            pass
        if name in self.entries:
            raise KeyError(f"{name!r} holds no weights; it is pipe.entries[{name!r}] (folder {self.entries[name].folder})")
        near = close_matches(name, list(self._models)) if isinstance(name, str) else []
        raise KeyError(f"{name!r}: no such loaded component; loaded: {sorted(self._models)}"
                       + (f"; did you mean {near}?" if near else ""))

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def class_name(self) -> str | None:
        """The pipeline class ``model_index.json`` names (``"WanPipeline"``), or ``None``."""
        name = self.config.get("_class_name")
        return name if isinstance(name, str) else None

    def __repr__(self) -> str:
        return (f"Pipeline({str(self.folder)!r}, {self.class_name}, models={list(self._models)}, "
                f"entries={list(self.entries)})")


def _is_model_class(library: str, class_name: str) -> bool:
    """Whether ``library.class_name`` is a ``torch.nn.Module`` (only diffusers and transformers are looked up)."""
    if library not in _MODEL_LIBRARIES:
        return False
    try:
        cls = getattr(importlib.import_module(library), class_name, None)
    except Exception:  # a lazy module that fails to import the class: not a model we can tell
        return False
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def _check_dtype(value: object, what: str) -> torch.dtype | None:
    """``value`` as a floating dtype (or its name, :func:`~fvtransform._dtypes.as_dtype`), or None."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.dtype)):
        raise UsageError(f"fvt.load_pipeline: {what} must be a torch.dtype (torch.bfloat16) or None; found "
                         f"{type(value).__name__} {value!r:.60}. Fix: dtype=torch.bfloat16, dtypes={{'text_encoder': torch.float32}}")
    return as_dtype(value, f"fvt.load_pipeline: {what}")


def _check_class(folder: Path, name: str, sub: Path, library: str, class_name: str) -> None:
    """Refuse a model component whose ``config.json`` names another class than ``model_index.json`` does.

    diffusers builds the index's class from that folder; fvtransform builds the config's. When the two
    disagree the folder is not what its pipeline says, whatever ``strict`` (which concerns keys).
    """
    declared = read_json(sub / "config.json").get("_class_name")
    if isinstance(declared, str) and declared != class_name:
        raise FormatError(
            f"{MODEL_INDEX} names it {library}.{class_name}, but its "
            f"{name}/config.json says _class_name {declared!r}; diffusers would build {class_name} from a "
            f"{declared} config. Fix: correct the entry in {MODEL_INDEX} (e.g. [\"diffusers\", \"{declared}\"]) or "
            f"put the right folder at {name}/"
        )


def _folder(path_or_repo_id: str | os.PathLike[str], wanted: list[str] | None, revision: str | None) -> Path:
    path = Path(path_or_repo_id)
    if not path.exists():
        from fvtransform.hub import maybe_download_model

        path = maybe_download_model(str(path_or_repo_id), revision=revision, components=wanted)
    if not path.is_dir() or not os.path.lexists(path / MODEL_INDEX):
        raise NotFoundError(
            f"{path}: not a diffusers pipeline (no {MODEL_INDEX}). Fix: pass the pipeline's folder or repo id; "
            "for one model folder use fvt.load_model"
        )
    return path


def _failed(e: FvTransformError, where: str, fix: str = "") -> FvTransformError:
    """``e`` again, its message prefixed with the pipeline and component (same class, chained), and ``fix`` added."""
    try:
        return type(e)(f"{where}: {e}" + (f". {fix}" if fix else ""))
    except Exception:  # a class with another signature: keep it as it is
        return e


def load_pipeline(
    path_or_repo_id: str | os.PathLike[str],
    components: Iterable[str] | None = None,
    *,
    dtype: DTypeLike | None = None,
    dtypes: Mapping[str, DTypeLike] | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    revision: str | None = None,
) -> Pipeline:
    """Load a diffusers pipeline's components: each model as ``(module on meta, tree)``, the rest as entries.

    ``path_or_repo_id`` is a pipeline folder (with ``model_index.json``) or a Hub repo id; for a repo id
    only ``model_index.json`` and the folders of ``components`` are downloaded. ``components=None``
    takes every component the index names (``null`` entries are absent, not errors); a name the index
    lacks, or names as null, is a :class:`NotFoundError` listing the components and the close names.

    Each model component goes through :func:`fvtransform.load_model` (``strict``, ``device``, its
    class's keep-in-float32 declarations) with ``dtypes.get(name, dtype)``: ``dtype=torch.bfloat16,
    dtypes={"text_encoder": torch.float32}`` is the usual Wan setup.

    >>> pipe = fvt.load_pipeline("Wan-AI/Wan2.2-T2V-A14B-Diffusers", ["transformer", "transformer_2"],
    ...                          dtype=torch.bfloat16)                       # doctest: +SKIP
    >>> high, low = pipe["transformer"].tree, pipe["transformer_2"].tree     # doctest: +SKIP

    Raises:
        NotFoundError: no ``model_index.json``; a component not in the pipeline; a model component's folder,
            ``config.json`` or weights missing (the message names the pipeline and the component).
        UsageError: ``components`` not a list of names (or empty), ``dtype`` not a floating ``torch.dtype`` (or
            its name), a ``dtypes`` key that names no loaded model component, a ``device`` torch does not know,
            ``strict`` not a bool.
        FormatError: a model component whose ``config.json`` names another ``_class_name`` than
            ``model_index.json``; an index entry that is not two strings or two nulls.
        KeyMismatchError, ShapeMismatchError, FormatError, UnsafeFileError: as :func:`fvtransform.load_model`
            raises them for one component, prefixed with the pipeline and the component.
    """
    if components is not None and not isinstance(components, (str, bytes, Mapping)):
        try:
            components = list(components)  # once: a generator is used up by the checks below
        except TypeError:
            pass
    if isinstance(components, str) or (components is not None and not (isinstance(components, list)
                                                                       and all(isinstance(c, str) for c in components))):
        raise UsageError(f"fvt.load_pipeline: components must be a list of names; found {components!r:.80}. "
                         'Fix: components=["transformer", "vae"]')
    if components is not None and not components:  # for a repo id, [] would otherwise fetch everything
        raise UsageError("fvt.load_pipeline: components=[] names no component. Fix: components=None for all of them, "
                         'or name those to load: components=["transformer", "vae"]')
    dtype = _check_dtype(dtype, "dtype")
    overrides = {k: _check_dtype(v, f"dtypes[{k!r}]") for k, v in (dtypes or {}).items()}
    strict = check_strict(strict, "fvt.load_pipeline")
    device = check_device(device, "fvt.load_pipeline")
    wanted = list(dict.fromkeys(components)) if components is not None else None
    folder = _folder(path_or_repo_id, wanted, revision)
    source = str(folder / MODEL_INDEX)
    index, config = read_pipeline_index(folder)
    if wanted is None:
        wanted = [k for k, v in index.items() if v is not None]
    require_components(index, wanted, source=source)
    models: dict[str, LoadedModel] = {}
    entries: dict[str, PipelineEntry] = {}
    plan: list[tuple[str, Path]] = []
    for name in wanted:
        entry = index[name]
        assert entry is not None  # require_components refused null entries
        library, class_name = entry
        sub = contained(folder, name, "pipeline component folder", folder / MODEL_INDEX)
        has_config = os.path.lexists(sub / "config.json")
        if _is_model_class(library, class_name) or has_config:
            if not sub.is_dir():
                raise NotFoundError(
                    f"{folder}: component {name!r} ({library}.{class_name}) has no folder {name}/. Fix: download "
                    f"the pipeline's {name}/ folder, or leave {name!r} out of components="
                )
            plan.append((name, sub))
        else:
            entries[name] = PipelineEntry(name, library, class_name, sub if sub.is_dir() else None)
    loaded = {n for n, _ in plan}
    unknown = [k for k in overrides if k not in loaded]
    if unknown:
        near = {k: close_matches(k, loaded) for k in unknown}
        raise UsageError(
            f"fvt.load_pipeline({str(folder)!r}): dtypes names {unknown}, which are not model components loaded "
            f"here (loaded: {sorted(loaded)}; close names: {near}). Fix: dtypes={{'text_encoder': torch.float32}} "
            "with a loaded component's name"
        )
    for name, sub in plan:
        library, class_name = index[name] or ("", "")
        if not os.path.lexists(sub / "config.json"):
            raise NotFoundError(
                f"{folder}: component {name!r} ({library}.{class_name}) has no {name}/config.json, so it cannot be "
                f"built. Fix: download the whole {name}/ folder (config.json and its weights)"
            )
        try:
            _check_class(folder, name, sub, library, class_name)
            models[name] = load_model(sub, dtype=overrides.get(name, dtype), device=device, strict=strict)
        except NotFoundError as e:  # a file of the component is missing: say what to fetch
            raise _failed(e, f"{folder}: component {name!r} ({library}.{class_name})", f"Fix: complete {sub}/ as the "
                          f"pipeline's repo has it (config.json and its weights), or leave {name!r} out of components=") from e
        except FvTransformError as e:
            raise _failed(e, f"{folder}: component {name!r} ({library}.{class_name})") from e
    return Pipeline(models, folder=folder, entries=entries, config=config)
