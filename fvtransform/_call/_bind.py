"""``fvt.bind``: run code that is not functional (a diffusers pipeline) on a tree, for the duration of a ``with``.

The model is :func:`torch.nn.utils.stateless._reparametrize_module`, the machinery of
``torch.func.functional_call``: the module's parameter and buffer slots are pointed at the tree's
tensors and pointed back on exit. Decisions, and why:

- Strict first: the tree must hold exactly the module's state keys, of the shapes it expects, before any
  slot is touched (the checks of :func:`fvtransform.call`); a tied weight may be given under one of its
  names, as ``state_dict()`` has it or once.
- No copies: parameter slots hold the tree's tensors themselves (plain tensors, as ``functional_call``
  puts them: gradients flow to the tree's tensors). Persistent buffers are cloned, as :func:`fvt.call`
  clones them, so a module that updates a buffer in place (BatchNorm's running statistics) never
  changes the tree; buffers are small.
- The tree is never mutated: an in-place write to one of its tensors inside the ``with`` (caught by
  torch's version counter) raises :class:`~fvtransform.errors.ImmutableError` on exit, naming the keys.
- Restored on exit, even after an exception: every slot gets back the very object it held (so a bound
  meta module is a meta module again). Nesting works (inner binds restore to the outer tree), a module
  shared under two names is bound once per slot, and non-persistent buffers (rotary tables) stay the
  module's own.
- One owner at a time: a bind of a module (or of one of its submodules or parents) that another thread
  holds bound is refused with a :class:`~fvtransform.errors.UsageError` before any slot changes (two
  threads would interleave its slots and leave it bound to one caller's tree). Within one thread, blocks
  may exit out of order (an ``ExitStack``, generators, asyncio tasks): a block that exits while a later
  bind still holds a slot hands its saved object to that later bind, so the last exit restores the
  module's own parameters whatever the order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import threading
from typing import TypeVar

import torch
from torch import nn

from fvtransform._call._call import _as_module, _resolve
from fvtransform._messages import format_keys
from fvtransform.errors import ImmutableError, UsageError

__all__ = ["bind"]

M = TypeVar("M", bound=nn.Module)

_Slot = tuple[dict[str, torch.Tensor | None], str, torch.Tensor | None, str]


class _Entry:
    """One active ``with fvt.bind``: its thread, the modules it holds and the objects its slots held before."""

    __slots__ = ("thread", "modules", "saved")

    def __init__(self, modules: list[nn.Module], saved: list[_Slot]) -> None:
        self.thread = threading.get_ident()
        self.modules = {id(m): m for m in modules}
        self.saved = saved


_LOCK = threading.Lock()
_ACTIVE: list[_Entry] = []  # in order of entry; guarded by _LOCK


def _enter(module: nn.Module, saved: list[_Slot]) -> _Entry:
    """Register a bind of ``module``, refusing one whose modules another thread holds bound."""
    entry = _Entry([m for _p, m in module.named_modules(remove_duplicate=False)], saved)
    with _LOCK:
        for other in _ACTIVE:
            if other.thread != entry.thread and not other.modules.keys().isdisjoint(entry.modules):
                raise UsageError(
                    f"fvt.bind({type(module).__name__}): the module (or a part of it) is bound to another tree in "
                    "another thread; binding it here too would interleave its weights and leave it bound to one "
                    "caller's tree. Fix: use fvt.call(module, tree, *inputs), which never changes the module and is "
                    "safe from many threads, or give each thread its own module (copy.deepcopy(module))"
                )
        _ACTIVE.append(entry)
    return entry


def _exit(entry: _Entry) -> None:
    """Give each slot of ``entry`` back: to a later bind still holding it (out of order), else to the slot."""
    with _LOCK:
        index = _ACTIVE.index(entry)
        later = _ACTIVE[index + 1:]
        for slots, name, old, _key in reversed(entry.saved):
            for other in later:
                hit = next((i for i, s in enumerate(other.saved) if s[0] is slots and s[1] == name), None)
                if hit is not None:
                    held = other.saved[hit]
                    other.saved[hit] = (held[0], held[1], old, held[3])
                    break
            else:
                slots[name] = old
        del _ACTIVE[index]


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place write), or None where torch keeps none."""
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference-mode tensors and some subclasses track no version
        return None


@contextlib.contextmanager
def bind(module: M, tree: Mapping[str, torch.Tensor], /) -> Iterator[M]:
    """Make ``module`` use the tensors of ``tree`` inside a ``with`` block; restore its own on exit.

    For code that calls the module itself (a diffusers pipeline's ``__call__``), where :func:`fvt.call`
    cannot be used. ``tree`` must hold exactly the module's parameters and persistent buffers (a
    :class:`~fvtransform.errors.KeyMismatchError` or
    :class:`~fvtransform.errors.ShapeMismatchError` otherwise, before anything changes). Parameters are
    the tree's tensors (no copies); buffers are cloned; non-persistent buffers stay the module's.

    >>> import torch, fvtransform as fvt
    >>> lin = torch.nn.Linear(2, 1)
    >>> tree = fvt.ParamTree({"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
    >>> with fvt.bind(lin, tree):
    ...     lin(torch.tensor([[1.0, 2.0]])).item()
    3.0
    >>> lin.weight is not tree["weight"]
    True

    Yields:
        ``module`` itself, bound.

    Raises:
        UsageError: ``module`` is not an ``nn.Module``, or ``tree`` not a mapping.
        KeyMismatchError: missing or unexpected keys, tied keys given different tensors.
        ShapeMismatchError: a tensor of another shape or kind than the module's.
        ImmutableError: on exit, when the block wrote into one of the tree's tensors in place.
    """
    module = _as_module(module, tree, "bind")  # type: ignore[assignment]
    if not isinstance(tree, Mapping):
        raise UsageError(f"fvt.bind: the tree must be a mapping of key -> tensor (a ParamTree); found "
                         f"{type(tree).__name__}. Fix: with fvt.bind(module, tree): ...")
    state, values, _buffers = _resolve(module, tree, "fvt.bind: the tree", "bind")
    versions = {k: (t, _version(t)) for k, t in tree.items() if isinstance(t, torch.Tensor)}
    saved: list[_Slot] = []
    for path, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for slots in (mod._parameters, mod._buffers):
            for name, old in slots.items():
                if prefix + name in values:
                    saved.append((slots, name, old, prefix + name))
    entry = _enter(module, saved)
    try:
        for slots, name, _old, key in saved:
            slots[name] = values[key]
        yield module
    finally:
        _exit(entry)
    written = [k for k, (t, v) in versions.items() if v is not None and _version(t) != v]
    if written:
        raise ImmutableError(
            f"fvt.bind({type(module).__name__}): the code inside the with block wrote into the tree's tensors in place: "
            f"{format_keys(written)}; trees are immutable values, and this one has now changed. Fix: do not update "
            "weights in place while bound (optimizer.step, .add_(), copy_()); make a new tree with fvt.update or "
            "fvt.map_tensors"
        )

