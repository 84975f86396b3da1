"""The functional-call boundary: run a module on a tree, strictly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform._messages import format_keys
from fvtransform.tree._ops import update
from fvtransform.tree._paramtree import ParamTree, state_keys

__all__ = ["call", "call_with_buffers", "check_keys"]

#: Tensor types whose bytes can be compared by address (a DTensor's or a fake tensor's cannot).
_PLAIN = (torch.Tensor, nn.Parameter)
_FIX_KEYS = (
    "Fix: load the checkpoint that belongs to this model, rename keys with fvt.rename, "
    "or select the keys you need with fvt.select."
)


#: What the module's ``forward`` returns: ``fvt.call(nn.Linear(2, 1), ...)`` is a ``Tensor`` to a type checker.
Out = TypeVar("Out", covariant=True)


class _Forward(Protocol[Out]):
    """An ``nn.Module`` as a type checker sees it here: its ``forward`` and what that returns."""

    def forward(self, *args: Any, **kwargs: Any) -> Out: ...


def _as_module(module: object, tree: object, fn: str, rest: str = "*args, **kwargs") -> nn.Module:
    """``module`` itself, or an error that shows the call (trees and modules swapped is the usual slip)."""
    if isinstance(module, nn.Module):
        return module
    swapped = " (the module and the tree are swapped)" if isinstance(tree, nn.Module) else ""
    raise UsageError(
        f"fvt.{fn}: the first argument must be an nn.Module; found {type(module).__name__}{swapped}. "
        f"Fix: fvt.{fn}(module, tree, {rest})."
    )


def _module_state(module: nn.Module) -> tuple[dict[str, tuple[str, torch.Tensor]], list[list[str]]]:
    """Every state key of ``module`` (tied names included) -> ``(kind, tensor)``, in ``state_dict`` order,
    and the groups of keys that name one tensor (tied weights)."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    first: dict[int, str] = {}
    tied: dict[int, list[str]] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for kind, slots in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for name, t in slots.items():
                if t is None or (kind == "buffer" and name in mod._non_persistent_buffers_set):
                    continue
                key = prefix + name
                out[key] = (kind, t)
                seen = first.setdefault(id(t), key)
                if seen is not key:
                    tied.setdefault(id(t), [seen]).append(key)
    return out, list(tied.values())


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are one tensor: the same object, or the same view of the same bytes (``state_dict()`` detaches)."""
    if a is b:
        return True
    if type(a) not in _PLAIN or type(b) not in _PLAIN or a.device.type == "meta":
        return False
    try:
        return (
            a.device == b.device
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        )
    except (RuntimeError, NotImplementedError):  # functorch wrappers (vmap, grad) have no storage to compare
        return False


def _key_error(module: nn.Module, what: str, missing: list[str], unexpected: list[str]) -> KeyMismatchError:
    lines = [f"{what} does not fit {type(module).__name__}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {format_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {format_keys(unexpected)}")
    lines.append(_FIX_KEYS)
    return KeyMismatchError("\n".join(lines))


def check_keys(module: nn.Module, tree: Mapping[str, torch.Tensor], *, what: str = "tree") -> dict[str, tuple[str, str]]:
    """Raise :class:`KeyMismatchError` unless ``tree`` has exactly the module's state keys.

    Keys of weights the module ties (one tensor under several names) may be
    given under one of their names only: the module ties the others.
    """
    expected = state_keys(module)
    _, tied = _module_state(module)
    optional = {k for g in tied if any(n in tree for n in g) for k in g}
    missing = [k for k in expected if k not in tree and k not in optional]
    unexpected = [k for k in tree if k not in expected]
    if missing or unexpected:
        raise _key_error(module, what, missing, unexpected)
    return expected


def _complete_ties(
    module: nn.Module, tree: Mapping[str, torch.Tensor], groups: list[list[str]], what: str
) -> dict[str, torch.Tensor]:
    """The tree's tensor for every name of each tied group (given under one name, or under several as one tensor)."""
    extra: dict[str, torch.Tensor] = {}
    for group in groups:
        given = [k for k in group if k in tree]
        if not given:
            continue
        first = tree[given[0]]
        other = next((k for k in given[1:] if not _same_tensor(tree[k], first)), None)
        if other is not None:
            raise KeyMismatchError(
                f"{what}: {type(module).__name__} ties {group} (one weight), but the {what} holds different tensors "
                f"for {given[0]!r} and {other!r}. Fix: give the tied weight once (fvt.drop the other names) or as one "
                f"tensor under each name (fvt.update(tree, {{{other!r}: tree[{given[0]!r}]}}))."
            )
        extra.update({k: first for k in group})
    return extra


def _check_tensors(module: nn.Module, params: Mapping[str, torch.Tensor], state: Mapping[str, tuple[str, torch.Tensor]], what: str) -> None:
    """Raise :class:`ShapeMismatchError` for any shape (or floating/integer kind) the module does not expect."""
    bad: list[str] = []
    meta: tuple[bool, str] | None = None
    mixed: str | None = None
    for key, value in params.items():
        ref = state[key][1]
        if value.shape != ref.shape:
            bad.append(f"  {key!r}: expected shape {list(ref.shape)}, found {list(value.shape)}")
        elif value.dtype is not ref.dtype and value.dtype.is_floating_point is not ref.dtype.is_floating_point:
            bad.append(f"  {key!r}: expected a {ref.dtype} tensor (or another of its kind), found {value.dtype}")
        if meta is None:
            meta = (value.is_meta, key)
        elif mixed is None and value.is_meta is not meta[0]:
            mixed = key
    if meta is not None and mixed is not None:
        on_meta, off_meta = (meta[1], mixed) if meta[0] else (mixed, meta[1])
        bad.append(f"  {on_meta!r} is on the meta device (no data) while {off_meta!r} is not: the tree was never loaded for real")
    if bad:
        shown = bad[:12] + ([f"  ... ({len(bad) - 12} more)"] if len(bad) > 12 else [])
        raise ShapeMismatchError(
            f"{what} does not fit {type(module).__name__} ({len(bad)} tensors):\n" + "\n".join(shown) + "\n"
            "Fix: check that the checkpoint and config.json belong together (the model built from the config "
            "expects these shapes), or convert the tree (fvt.rename / fvt.KeyMap) before calling."
        )


def check_not_meta(params: Mapping[str, torch.Tensor], args: tuple[object, ...], kwargs: Mapping[str, object], fn: str) -> None:
    """Meta weights (no data) with real inputs: a :class:`UsageError` naming the cause, not torch's device error.

    A tree and inputs all on meta (shape inference) run.
    """
    on_meta = [k for k, v in params.items() if v.is_meta]
    if not on_meta:
        return
    inputs = [*args, *kwargs.values()]
    if any(isinstance(x, torch.Tensor) and not x.is_meta for x in inputs):
        raise UsageError(
            f"fvt.{fn}: the tree's tensors are on the meta device (no data; e.g. {format_keys(on_meta[:3])}), "
            "the inputs are real. A module from fvt.build (or ParamTree.from_module of it) has no weights: "
            "load them, fvt.call(module, fvt.load(path), *inputs), or use fvt.load_model(path)"
        )


def _resolve(
    module: nn.Module, tree: Mapping[str, torch.Tensor], what: str, fn: str
) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, torch.Tensor], list[str]]:
    """The tensors the module runs on, checked: ``(state, values by state key, buffer keys)``.

    Keys must match exactly (ties completed), every value must be a tensor of the expected shape and kind;
    buffers are cloned, since a module may update them in place (BatchNorm): never the caller's tensor.
    """
    state, groups = _module_state(module)
    tied = _complete_ties(module, tree, groups, what) if groups else {}
    missing = [k for k in state if k not in tree and k not in tied]
    unexpected = [k for k in tree if k not in state]
    if missing or unexpected:
        raise _key_error(module, what, missing, unexpected)
    raw = {key: tied[key] if key in tied else tree[key] for key in state}
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UsageError(
            f"fvt.{fn}({type(module).__name__}): the tree's values must be tensors; found "
            f"{type(raw[not_tensors[0]]).__name__} at {format_keys(not_tensors)}. Fix: make a tree of tensors, "
            "e.g. fvt.ParamTree({key: torch.as_tensor(value)})"
        )
    values: dict[str, torch.Tensor] = {}
    buffer_keys: list[str] = []
    clones: dict[int, torch.Tensor] = {}
    for key, (kind, _ref) in state.items():
        value = raw[key]
        if kind == "buffer":
            value = clones.setdefault(id(value), value.clone())
            buffer_keys.append(key)
        values[key] = value
    _check_tensors(module, values, state, what)
    return state, values, buffer_keys


def _prepare(
    module: nn.Module, tree: Mapping[str, torch.Tensor], what: str = "tree", compute_dtype: torch.dtype | str | None = None,
    fn: str = "call",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    from fvtransform.tree._fp8 import compute_dtype_of, maybe_fp8, runnable  # float8: layout keys out, each weight upcast when used

    if compute_dtype is not None:  # checked whatever the tree holds: a wrong name is never ignored
        compute_dtype = compute_dtype_of(compute_dtype, f"fvt.{fn}")
    if maybe_fp8(tree):
        tree = runnable(tree, {k: t for k, (_kind, t) in _module_state(module)[0].items()}, compute_dtype, fn)
    _state, params, buffer_keys = _resolve(module, tree, what, "call")
    return params, buffer_keys


def call(
    module: _Forward[Out], tree: Mapping[str, torch.Tensor], /, *args: object,
    compute_dtype: torch.dtype | str | None = None, **kwargs: object,
) -> Out:
    """Run ``module(*args, **kwargs)`` with the tensors of ``tree``, strictly.

    The tree must hold exactly the module's parameters and persistent buffers
    (``torch.func.functional_call`` alone silently falls back to the module's
    own tensors for missing keys), each of the shape the module expects and
    of its kind (floating point or not; float32 next to bfloat16 is fine, as
    models keep some modules in float32). Weights the module ties may be given
    under one of their names, or under each as one tensor (as
    ``module.state_dict()`` has them). Non-persistent buffers (rotary tables,
    position ids) come from the module. Buffers are cloned at the boundary, so
    a module that updates them in place does not change the tree; use
    :func:`call_with_buffers` to get the updated buffers back. The module
    object and the tree are not mutated. The result is what ``module.forward``
    returns, typed as its annotation says.

    A float8 tree runs as it is: each float8 weight is dequantised to
    ``compute_dtype`` (default: the module's own dtype for that weight), times
    its ``scale_weight`` in the scaled-fp8 layout, when its layer uses it, and
    dropped after, so no full-precision copy of the model is made; the result
    equals ``fvt.call(module, fvt.dequantize(tree, compute_dtype), ...)`` bit
    for bit. The layout's ``scale_weight`` / ``scale_input`` / ``scaled_fp8``
    keys are understood, not reported as unexpected. ``compute_dtype`` is about
    float8 weights only: other tensors run in the dtype the tree holds them in.

    >>> import torch, fvtransform as fvt
    >>> lin = torch.nn.Linear(2, 1)
    >>> tree = fvt.ParamTree({"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
    >>> fvt.call(lin, tree, torch.tensor([[1.0, 2.0]]))
    tensor([[3.]])
    >>> fvt.call(lin, {"weight": torch.ones(1, 2)}, torch.zeros(1, 2))
    Traceback (most recent call last):
    ...
    fvtransform.errors.KeyMismatchError: tree does not fit Linear:
      missing (1): ['bias']
    Fix: load the checkpoint that belongs to this model, rename keys with fvt.rename, or select the keys you need with fvt.select.
    >>> fvt.call(lin, {"weight": torch.ones(1, 3), "bias": torch.zeros(1)}, torch.zeros(1, 2))
    Traceback (most recent call last):
    ...
    fvtransform.errors.ShapeMismatchError: tree does not fit Linear (1 tensors):
      'weight': expected shape [1, 2], found [1, 3]
    Fix: check that the checkpoint and config.json belong together (the model built from the config expects these shapes), or convert the tree (fvt.rename / fvt.KeyMap) before calling.
    """
    mod = _as_module(module, tree, "call")
    params, _ = _prepare(mod, tree, compute_dtype=compute_dtype)
    check_not_meta(params, args, kwargs, "call")
    out: Out = torch.func.functional_call(mod, params, args, kwargs, tie_weights=True, strict=False)
    return out


def call_with_buffers(
    module: _Forward[Out], tree: Mapping[str, torch.Tensor], /, *args: object, **kwargs: object
) -> tuple[Out, ParamTree]:
    """Like :func:`call`, and also return a new tree holding the updated buffers.

    >>> import torch, fvtransform as fvt
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> tree = fvt.ParamTree.from_module(bn)
    >>> _, new = fvt.call_with_buffers(bn, tree, torch.randn(4, 2))
    >>> int(new["num_batches_tracked"]), int(tree["num_batches_tracked"])
    (1, 0)
    """
    mod = _as_module(module, tree, "call_with_buffers")
    params, buffer_keys = _prepare(mod, tree)
    check_not_meta(params, args, kwargs, "call_with_buffers")
    out: Out = torch.func.functional_call(mod, params, args, kwargs, tie_weights=True, strict=False)
    base = tree if isinstance(tree, ParamTree) else ParamTree(tree)
    return out, update(base, {k: params[k] for k in buffer_keys if k in base})
