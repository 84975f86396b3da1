"""Bounds on building a module: time, modules, and the real memory its constructor computes.

A ``config.json`` decides how much work a constructor does (``num_layers: 100000`` builds for
minutes, ``rope_max_seq_len: 10**9`` computes a rotary table of many GB). :func:`budgeted` runs a
constructor under :class:`BuildLimits`:

- every real (non-meta) tensor an ATen op would create is sized *before* the op runs (by running
  the op on the meta device first), so a table too large is refused without allocating it;
- on meta, no real tensor larger than what is left of ``max_computed_bytes`` is ever allocated:
  an uninitialised one (``torch.empty``: how every parameter starts, before it moves to meta) is
  made on the meta device instead (a *placeholder*; its values were garbage anyway), and writing
  into a placeholder or registering it as a buffer is refused as computing that many bytes;
- modules are counted as they are registered on their parents;
- a wall-clock deadline is checked at every op and registration.

Building on meta (:func:`meta_parameters`) uses the same per-thread state: a parameter-registration
hook moves new parameters to the meta device only in a thread that is inside :func:`meta_parameters`.

What is process-wide, and why it is harmless: the first build or :func:`meta_parameters` of the
process registers three global ``nn.Module`` registration hooks (parameter, module, buffer; through
torch's public ``register_module_*_registration_hook``), once, and never removes them. Outside a
context each hook reads one context variable, finds nothing, and returns ``None`` (torch then keeps
the parameter, module or buffer as it is): a module built after the context, or in another thread
during it, is built exactly as without fvtransform. The state lives in a context variable *and*
names the thread that entered it, so a context copied into another thread (``asyncio.to_thread``,
``contextvars.copy_context().run``, new threads on free-threaded Python 3.14) does not carry it.
No attribute of ``nn.Module``, ``nn.Parameter`` or any torch function is patched. The one other
global effect is torch's own: while :func:`budgeted` runs on meta, its dispatch mode (torch keeps
the mode stack per thread) sees the ops of this thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
import contextvars
import math
import threading
import time
from typing import Any
import weakref

import attrs
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fvtransform.errors import FormatError

__all__ = ["BuildLimits", "DEFAULT_BUILD_LIMITS", "budgeted", "meta_parameters"]


@attrs.frozen
class BuildLimits:
    """What building one module may spend (override with ``fvt.build(..., limits=BuildLimits(...))``).

    The defaults leave wide room for real video models (Wan 14B: 1,138 modules, about 14 MB of
    computed buffers, largest uninitialised parameter 0.6 GB; UMT5-XXL: a 4 GB embedding table before
    it moves to meta; each builds in well under a second here).

    Attributes:
        max_modules: submodules registered while building.
        max_seconds: wall-clock time of the constructor (meta builds only).
        max_computed_bytes: bytes of real tensors computed while building on meta, in total (rotary
            tables, position ids, initial values of parameters before they move to meta). No single
            real tensor larger than what is left of it is allocated: a larger uninitialised one
            (``torch.empty``) is made on meta, so a 4 GB embedding costs no memory.
        max_tensor_bytes: bytes of any one tensor, even an uninitialised ``torch.empty`` made on meta
            (meta builds only): a sanity bound on config numbers, 1.5 times the largest tensor of the
            models this library targets (UMT5-XXL's embedding, 4.2 GB in float32).

    Not bounded: work a constructor does in pure Python or NumPy without creating a torch tensor
    or a module (the deadline is checked only at torch ops and module / parameter registrations).
    """

    max_modules: int = 10_000
    max_seconds: float = 60.0
    max_computed_bytes: int = 1 << 30
    max_tensor_bytes: int = 6 << 30


#: The limits :func:`fvtransform.build` uses when none are given.
DEFAULT_BUILD_LIMITS = BuildLimits()

#: Ops that allocate without writing: bounded by ``max_tensor_bytes``; made real only while the rest of the budget could hold them.
_EMPTY = torch.ops.aten.empty.memory_format
_UNINITIALISED = frozenset({
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
})


@attrs.define
class _State:
    """Per-thread build state (held in a context variable)."""

    meta: bool
    limits: BuildLimits | None = None
    bounded_memory: bool = False
    what: str = "the module"
    suspects: Callable[[str], str] = lambda _kind: ""
    deadline: float = float("inf")
    modules: int = 0
    computed: int = 0
    #: uninitialised tensors made on meta instead of for real (too large for what is left of the budget)
    placeholders: dict[int, weakref.ref[torch.Tensor]] = attrs.field(factory=dict)  # by id: tensors' == is elementwise
    #: bytes of the real uninitialised tensors still alive (a parameter's ``torch.empty`` until it moves to meta)
    live: int = 0
    #: the thread that entered the context: a context copied into another thread (``asyncio.to_thread``,
    #: ``contextvars.copy_context().run``, new threads on free-threaded Python 3.14) does not carry it there
    thread: int = attrs.field(factory=threading.get_ident)

    def fail(self, kind: str, detail: str) -> FormatError:
        return FormatError(f"{self.what}: {detail}{self.suspects(kind)}")

    def tick(self) -> None:
        if self.limits is not None and time.monotonic() > self.deadline:
            raise self.fail(
                "time", f"building took more than {self.limits.max_seconds:g} s (BuildLimits.max_seconds)"
            )

    def charge(self, func: Any, nbytes: int, *, touched: bool) -> None:
        limits = self.limits
        if limits is None or not self.bounded_memory:
            return
        if touched:  # computed bytes first: a table too large to compute is named by the budget it breaks
            self.computed += nbytes
            if self.computed > limits.max_computed_bytes:
                raise self.fail("bytes", f"building would compute more than {limits.max_computed_bytes} bytes of "
                                "real tensors (BuildLimits.max_computed_bytes)")
        if nbytes > limits.max_tensor_bytes:
            raise self.fail("bytes", f"{func} would create a tensor of {nbytes} bytes while building, more than "
                            f"{limits.max_tensor_bytes} (BuildLimits.max_tensor_bytes)")

    def left(self) -> int:
        """Bytes of real tensors that may still be allocated: the budget less what was computed and what is
        allocated uninitialised and still alive (unbounded without limits)."""
        if self.limits is None or not self.bounded_memory:
            return 1 << 62
        return self.limits.max_computed_bytes - self.computed - self.live

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def is_placeholder(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a placeholder or a view of one."""
        cur: torch.Tensor | None = t
        while cur is not None:
            ref = self.placeholders.get(id(cur))
            if ref is not None and ref() is cur:
                return True
            cur = cur._base
        return False

    def add_placeholder(self, t: torch.Tensor) -> None:
        key = id(t)
        self.placeholders[key] = weakref.ref(t, lambda _r: self.placeholders.pop(key, None))

    def refuse_placeholder(self, act: str, t: torch.Tensor) -> FormatError:
        limits = self.limits
        assert limits is not None
        return self.fail("bytes", f"{act} a tensor of shape {tuple(t.shape)} ({_nbytes(t)} bytes) created "
                         f"uninitialised while building; computing it would exceed the {limits.max_computed_bytes} "
                         f"bytes left of BuildLimits.max_computed_bytes ({self.computed} already computed)")


_STATE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("fvtransform_build_state", default=None)
_INSTALL_LOCK = threading.Lock()
_installed = False


def _current() -> _State | None:
    """The build state of this thread's context, if this thread entered it."""
    state = _STATE.get()
    return state if state is not None and state.thread == threading.get_ident() else None


def _on_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    state = _current()
    if state is None or param is None:
        return None
    state.tick()
    if state.meta and param.device.type != "meta":
        return type(param)(param.to("meta"), requires_grad=param.requires_grad)
    return None


def _on_buffer(module: nn.Module, name: str, buffer: torch.Tensor | None) -> None:
    state = _current()
    if state is not None and buffer is not None and state.placeholders and state.is_placeholder(buffer):
        raise state.refuse_placeholder(f"registering buffer {name!r} of {type(module).__name__}, which is", buffer)
    return None


def _on_module(module: nn.Module, name: str, sub: nn.Module | None) -> None:
    state = _current()
    if state is None or sub is None or state.limits is None:
        return None
    state.tick()
    state.modules += 1
    if state.modules > state.limits.max_modules:
        raise state.fail("modules", f"building registers more than {state.limits.max_modules} modules "
                         "(BuildLimits.max_modules)")
    return None


def _install_hooks() -> None:
    """Register the process-wide registration hooks once; they act only where the state is set."""
    global _installed
    with _INSTALL_LOCK:
        if not _installed:
            # torch annotates the hook as returning None; it documents (and honours) a returned replacement parameter
            nn.modules.module.register_module_parameter_registration_hook(_on_parameter)  # type: ignore[arg-type]
            nn.modules.module.register_module_module_registration_hook(_on_module)
            nn.modules.module.register_module_buffer_registration_hook(_on_buffer)
            _installed = True


@contextlib.contextmanager
def _entered(state: _State) -> Iterator[_State]:
    _install_hooks()
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside this context (in this thread only), new parameters are created on the meta device.

    Buffers are created for real, so non-persistent buffers (rotary tables,
    position ids), which no checkpoint holds, have their true values. Code
    outside the context is untouched: another thread (even one running a copy
    of this context), and this thread after the context exits (by an error
    too), build real modules. The first use installs torch's global module
    registration hooks once for the process; they act only inside a context
    (see the module docstring).

    >>> import torch
    >>> with meta_parameters():
    ...     inside = torch.nn.Linear(2, 2)
    >>> inside.weight.device.type, torch.nn.Linear(2, 2).weight.device.type
    ('meta', 'cpu')
    """
    with _entered(_State(meta=True)):
        yield


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or outputs (tensors, and lists / tuples / dicts of them)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _out_device(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.device:
    dev = kwargs.get("device")
    if dev is not None:
        return dev if isinstance(dev, torch.device) else torch.device(dev)
    for a in args:  # the first tensor argument (flat, or the first of a list: cat, stack)
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    for t in _tensors(kwargs):
        return t.device
    return _CPU


_CPU = torch.device("cpu")
_META = torch.device("meta")


def _takes_device(func: Any) -> bool:
    return any(a.name == "device" for a in func._schema.arguments)
_WRITTEN: dict[Any, tuple[int, ...]] = {}


def _written(func: Any) -> tuple[int, ...]:
    """Positions of the arguments an op writes in place (cached per op)."""
    found = _WRITTEN.get(func)
    if found is None:
        found = tuple(i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
        _WRITTEN[func] = found
    return found


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta") if x.device.type != "meta" else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    return x


class _BudgetMode(TorchDispatchMode):
    """Sizes each real tensor an op creates, on meta, before the op runs."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        state = self.state
        state.tick()
        written = [args[i] for i in _written(func) if i < len(args)]
        if state.placeholders:  # writing into a placeholder would compute it: as many bytes as it holds
            for t in written:
                if isinstance(t, torch.Tensor) and state.is_placeholder(t):
                    raise state.refuse_placeholder(f"{func} writes into", t)
        if func.is_view or _out_device(args, kwargs).type == "meta":
            out = func(*args, **kwargs)
            if state.placeholders and not func.is_view and any(state.is_placeholder(t) for t in _tensors((args, kwargs))):
                for t in _tensors(out):  # computed from a placeholder's garbage: no buffer may hold it either
                    state.add_placeholder(t)
            return out
        if written:  # an in-place op writes (touches) the tensors it mutates and creates none
            for t in written:
                if isinstance(t, torch.Tensor):
                    state.charge(func, _nbytes(t), touched=True)
            return func(*args, **kwargs)
        if func is _EMPTY:  # the commonest op (every parameter starts as one): sized from its arguments
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            return self._uninitialised(func, math.prod(args[0]) * dtype.itemsize, args, kwargs)
        touched = func not in _UNINITIALISED
        try:
            meta_kwargs = {k: (_META if k == "device" else _to_meta(v)) for k, v in kwargs.items()}
            if "device" not in kwargs and next(_tensors(args), None) is None and _takes_device(func):
                meta_kwargs["device"] = _META  # a factory on the default device
            predicted = func(*_to_meta(args), **meta_kwargs)
        except Exception:  # noqa: BLE001 (no meta kernel, or a data-dependent shape: measured after instead)
            predicted = None
        if not touched and isinstance(predicted, torch.Tensor):  # empty_like, new_empty, empty_strided
            return self._uninitialised(func, _nbytes(predicted), args, kwargs)
        if predicted is not None:
            for t in _tensors(predicted):
                state.charge(func, _nbytes(t), touched=touched)
        elif next(_tensors((args, kwargs)), None) is None:
            raise state.fail("bytes", f"{func} with arguments {args!r:.120} cannot be sized before it runs")
        out = func(*args, **kwargs)
        if predicted is None:
            for t in _tensors(out):
                if t.device.type != "meta":
                    state.charge(func, _nbytes(t), touched=touched)
        return out

    def _uninitialised(self, func: Any, nbytes: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An uninitialised tensor: for real if the rest of the budget could compute it, else a meta placeholder."""
        state = self.state
        state.charge(func, nbytes, touched=False)  # max_tensor_bytes
        if nbytes <= state.left():
            out = func(*args, **kwargs)
            if nbytes and state.bounded_memory:  # counted while it lives: real memory, even if untouched
                state.live += nbytes
                weakref.finalize(out, state._freed, nbytes)
            return out
        meta_kwargs = {k: v for k, v in kwargs.items() if k != "pin_memory"}
        out = func(*args, **{**meta_kwargs, "device": _META})
        state.add_placeholder(out)
        return out


@contextlib.contextmanager
def budgeted(
    limits: BuildLimits, *, meta: bool, what: str, suspects: Callable[[str], str]
) -> Iterator[None]:
    """Run the body (a constructor) under ``limits``; on meta, also bound time and real memory.

    ``what`` starts every message (the file and class); ``suspects(kind)`` ends it (the config keys
    that drive that kind of work, ``kind`` one of ``"modules"``, ``"bytes"``, ``"time"``).
    """
    state = _State(meta=meta, limits=limits, bounded_memory=meta, what=what, suspects=suspects,
                   deadline=time.monotonic() + limits.max_seconds if meta else float("inf"))
    with _entered(state):
        if meta:
            with _BudgetMode(state):
                yield
        else:
            yield
