"""AdapterStack: the factors of many LoRA adapters stacked per target, for one forward pass with an adapter per sample.

Layout (as S-LoRA / punica / vLLM keep resident adapters): per target key one
buffer ``A [capacity, R, in...]``, ``B [capacity, out, R]`` and the adapters'
own scales ``[capacity]`` (float32), ``R`` the largest rank any adapter has on
that key. A smaller rank is zero-padded (zeros add exact zeros); an adapter
that does not target a key has zero factors and own scale 0 there. A stack
value sees only its own rows (``rows``: position -> buffer row), so values
share buffers safely: rows are written once, when an adapter is added, at a
row no value has seen yet.

Costs: :meth:`AdapterStack.add` writes one row per key (the new adapter's
factors) while the buffers have room; when they are full it copies this
stack's live rows into buffers of twice the size (amortized O(1) rows per
add). A rank above a key's ``R``, or a key no adapter had, reallocates that
key's buffers only. :meth:`AdapterStack.drop` copies no tensor: the dropped
row stays in the buffers (unused) until an ``add`` grows them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import threading

import torch

from fvtransform.errors import ImmutableError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import FullDelta, LoraAdapter, LowRank

__all__ = ["AdapterStack", "stack"]

#: Rows a new stack's buffers hold beyond its adapters (so the first adds write in place).
_MIN_CAPACITY = 4


class _Rows:
    """The row allocator shared by every stack value built from one set of buffers (``claimed``: rows ever handed out)."""

    def __init__(self, capacity: int, claimed: int) -> None:
        self.capacity = capacity
        self.claimed = claimed
        self.lock = threading.Lock()

    def take(self) -> int | None:
        """A row nobody has seen, or None when the buffers are full."""
        with self.lock:
            if self.claimed >= self.capacity:
                return None
            self.claimed += 1
            return self.claimed - 1


class _Slot:
    """One key's buffers: ``A [cap, R, in...]``, ``B [cap, out, R]``, own scales ``[cap]`` float32.

    Where an adapter has DoRA on the key: ``mag [cap, out]`` (its magnitudes), ``eps [cap]`` (its ``dora_eps``)
    and ``dora [cap]`` (1 on its row), all float32; None while no adapter has DoRA there.
    """

    __slots__ = ("A", "B", "own", "mag", "eps", "dora")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, own: torch.Tensor, mag: torch.Tensor | None = None,
                 eps: torch.Tensor | None = None, dora: torch.Tensor | None = None) -> None:
        self.A, self.B, self.own = A, B, own
        self.mag, self.eps, self.dora = mag, eps, dora

    def with_dora(self) -> _Slot:
        """This slot sharing its factors, with zero DoRA buffers (no row has DoRA yet)."""
        if self.mag is not None:
            return self
        cap, out, dev = self.A.shape[0], self.B.shape[1], self.own.device
        return _Slot(self.A, self.B, self.own, torch.zeros((cap, out), device=dev), torch.zeros(cap, device=dev),
                     torch.zeros(cap, device=dev))

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[1])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.A.shape[2:])


def _label(position: int, name: str) -> str:
    return f"adapter #{position} {name!r}"


def _check_delta(key: str, d: object, where: str) -> LowRank:
    """A stackable delta (plain low rank) or a typed error naming the adapter and the key."""
    if isinstance(d, LowRank) and (d.magnitude is None or (d.magnitude.dim() == 1 and d.A.dim() == 2)):
        return d
    kind = ("a DoRA target of a convolution or with per-input-column magnitudes (LyCORIS wd_on_output=False)"
            if isinstance(d, LowRank) else ("a full delta" if isinstance(d, FullDelta) else f"a {type(d).__name__}"))
    raise UsageError(
        f"{where}: target {key!r} is {kind}; an adapter stack takes low-rank (LoRA) targets, "
        f"and DoRA on linear weights with per-output-row magnitudes. "
        f"Fix: merge this adapter (fvt.lora.merge) or run it alone with fvt.lora.call"
    )


class AdapterStack:
    """Many LoRA adapters' factors stacked per target, resident, for :func:`fvtransform.lora.call_batched`.

    Build it with :func:`fvtransform.lora.stack`. An immutable value: :meth:`add` and :meth:`drop` return a new
    stack sharing the buffers (see the module notes for their cost); positions are ``0 .. len(stack) - 1``,
    in order, and ``names[i]`` names position ``i`` in errors.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    >>> a = fvt.lora.random_adapter(tree, targets="*.weight", rank=2, seed=1)
    >>> s = fvt.lora.stack({"style": a})
    >>> s.add(a, name="twin").names
    ('style', 'twin')
    >>> s.names
    ('style',)
    """

    __slots__ = ("_slots", "_rows", "_alloc", "names", "dtype", "device", "_row_index", "_ones")
    _slots: Mapping[str, _Slot]
    _rows: tuple[int, ...]
    _alloc: _Rows
    names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    _row_index: torch.Tensor
    _ones: torch.Tensor

    def __init__(self, slots: Mapping[str, _Slot], rows: tuple[int, ...], alloc: _Rows, names: tuple[str, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        set_ = object.__setattr__
        set_(self, "_slots", dict(slots))
        set_(self, "_rows", rows)
        set_(self, "_alloc", alloc)
        set_(self, "names", names)
        set_(self, "dtype", dtype)
        set_(self, "device", device)
        # position -> buffer row, padded to the capacity with row 0 (never read: index values are checked below len)
        padded = list(rows) + [0] * (alloc.capacity - len(rows))
        set_(self, "_row_index", torch.tensor(padded, dtype=torch.long, device=device))
        set_(self, "_ones", torch.ones(len(rows), dtype=torch.float32, device=device))

    def __setattr__(self, name: str, value: object) -> None:
        raise ImmutableError(f"AdapterStack is immutable: cannot set {name!r}; use .add(adapter) or .drop(i) for a new stack")

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    @property
    def keys(self) -> tuple[str, ...]:
        """The target keys any adapter of the stack has (sorted)."""
        return tuple(sorted(self._slots))

    @property
    def ranks(self) -> dict[str, int]:
        """Key -> the padded rank ``R`` of its buffers (the largest rank any adapter has there)."""
        return {k: s.rank for k, s in sorted(self._slots.items())}

    @property
    def capacity(self) -> int:
        """Rows the buffers hold (adapters this stack and the values sharing its buffers can add without copying)."""
        return self._alloc.capacity

    def targets(self, key: str) -> list[int]:
        """The positions of the adapters that target ``key`` (own scale other than 0 there)."""
        slot = self._slots.get(key)
        if slot is None:
            return []
        own = slot.own[list(self._rows)]
        return [i for i, v in enumerate(own.tolist()) if v != 0.0]

    def describe(self, position: int) -> str:
        """``adapter #i 'name'``: how errors name an adapter of this stack."""
        return _label(position, self.names[position])

    def __repr__(self) -> str:
        return f"AdapterStack({len(self)} adapters {list(self.names)}, {len(self._slots)} targets, ranks {sorted(set(self.ranks.values()))})"

    def add(self, adapter: LoraAdapter, *, name: str | None = None) -> AdapterStack:
        """A new stack with ``adapter`` at position ``len(self)``; this stack is unchanged.

        Writes only the new adapter's row while the buffers have room; see the module notes for the cost of growth.

        Raises:
            UsageError: ``adapter`` is not a LoraAdapter, has DoRA, LoHa/LoKr or full-delta targets, or ``name``
                is taken.
            ShapeMismatchError: a target's shape differs from the other adapters' on that key.
        """
        position = len(self)
        if name is None:  # "#<position>", or the next free "#<n>" after a drop
            name = next(f"#{n}" for n in range(position, position + len(self) + 1) if f"#{n}" not in self.names)
        if not isinstance(name, str) or name in self.names:
            raise UsageError(f"AdapterStack.add: name {name!r} must be a string no other adapter of the stack has "
                             f"(names: {list(self.names)}). Fix: .add(adapter, name='another')")
        where = _label(position, name)
        deltas = _check_adapter(adapter, where)
        for key, d in deltas.items():
            slot = self._slots.get(key)
            if slot is not None:
                _check_fits(key, d, slot.in_shape, slot.out_features, where, [self.describe(i) for i in self.targets(key)])
        row = self._alloc.take()
        slots, alloc, rows = dict(self._slots), self._alloc, self._rows
        if row is None:  # full: copy this stack's live rows into buffers twice as large
            capacity = max(2 * (len(rows) + 1), _MIN_CAPACITY)
            alloc = _Rows(capacity, len(rows) + 1)
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            slots = {k: _grow(s, capacity, s.rank, index) for k, s in slots.items()}
            rows, row = tuple(range(len(rows))), len(rows)
        with torch.no_grad():
            for key, d in deltas.items():
                slot = slots.get(key)
                if slot is None or d.rank > slot.rank:  # a new key, or a larger rank: this key's buffers only
                    slots[key] = slot = (_widen(slot, d.rank) if slot is not None
                                         else _empty(d, alloc.capacity, self.dtype, self.device))
                if d.magnitude is not None and slot.mag is None:
                    slots[key] = slot = slot.with_dora()
                _write(slot, row, d, self.dtype, self.device)
            for key, slot in slots.items():
                if key not in deltas:
                    slot.A[row].zero_()
                    slot.B[row].zero_()
                    slot.own[row] = 0.0
                    if slot.dora is not None:
                        slot.dora[row] = 0.0
        return AdapterStack(slots, (*rows, row), alloc, (*self.names, name), self.dtype, self.device)

    def drop(self, position: int) -> AdapterStack:
        """A new stack without the adapter at ``position`` (later positions shift down by one); copies no factor.

        Keys no remaining adapter targets leave the stack.

        Raises:
            UsageError: ``position`` is not a position of this stack, or it is the last adapter (a stack holds one
                or more).
        """
        if isinstance(position, bool) or not isinstance(position, int) or not -len(self) <= position < len(self):
            raise UsageError(f"AdapterStack.drop: position {position!r} is not in 0..{len(self) - 1} "
                             f"(adapters: {list(self.names)})")
        if len(self) == 1:
            raise UsageError(f"AdapterStack.drop: {self.describe(0)} is the only adapter; a stack holds one or more. "
                             "Fix: call fvt.call (no adapter) or pass index=-1 for every sample")
        position %= len(self)
        rows = self._rows[:position] + self._rows[position + 1:]
        names = self.names[:position] + self.names[position + 1:]
        live = torch.tensor(rows, dtype=torch.long, device=self.device)
        # keys only the dropped adapter targeted leave the stack (the call then neither needs nor computes them)
        slots = {k: s for k, s in self._slots.items() if bool((s.own[live] != 0).any())}
        return AdapterStack(slots, rows, self._alloc, names, self.dtype, self.device)


def _check_adapter(adapter: object, where: str) -> dict[str, LowRank]:
    if not isinstance(adapter, LoraAdapter):
        raise UsageError(f"{where}: expected a LoraAdapter, found {type(adapter).__name__}. "
                         "Fix: fvt.lora.stack([fvt.lora.load(path), ...])")
    return {key: _check_delta(key, d, where) for key, d in adapter.items()}


def _check_fits(key: str, d: LowRank, in_shape: tuple[int, ...], out: int, where: str, others: list[str]) -> None:
    """``d`` fits the stack's ``(out, in...)`` at ``key``, or a ShapeMismatchError naming both sides."""
    d_in, d_out = tuple(int(s) for s in d.A.shape[1:]), int(d.B.shape[0])
    if d_in != in_shape or d_out != out:
        raise ShapeMismatchError(
            f"{where}: target {key!r} has A {list(d.A.shape)} and B {list(d.B.shape)} (out {d_out}, in {list(d_in)}); "
            f"the stack holds out {out}, in {list(in_shape)} there"
            f"{' (from ' + ', '.join(others) + ')' if others else ''}. These adapters were made for different models: "
            "stack adapters of one base model"
        )


def _empty(d: LowRank, capacity: int, dtype: torch.dtype, device: torch.device) -> _Slot:
    r, out = d.rank, int(d.B.shape[0])
    return _Slot(torch.zeros((capacity, r, *d.A.shape[1:]), dtype=dtype, device=device),
                 torch.zeros((capacity, out, r), dtype=dtype, device=device),
                 torch.zeros(capacity, dtype=torch.float32, device=device))


def _grow(slot: _Slot, capacity: int, rank: int, index: torch.Tensor) -> _Slot:
    """New buffers of ``capacity`` rows and rank ``rank`` holding ``slot``'s rows ``index`` at rows ``0..len(index)``."""
    n = int(index.shape[0])
    A = slot.A.new_zeros((capacity, rank, *slot.A.shape[2:]))
    B = slot.B.new_zeros((capacity, slot.B.shape[1], rank))
    own = slot.own.new_zeros(capacity)
    grown = _Slot(A, B, own) if slot.mag is None else _Slot(A, B, own).with_dora()
    with torch.no_grad():
        if n:
            A[:n, : slot.rank] = slot.A[index]
            B[:n, :, : slot.rank] = slot.B[index]
            own[:n] = slot.own[index]
            for name in ("mag", "eps", "dora"):
                old, new = getattr(slot, name), getattr(grown, name)
                if old is not None:
                    new[:n] = old[index]
    return grown


def _widen(slot: _Slot, rank: int) -> _Slot:
    """``slot`` padded to rank ``rank``, every row where it was (the stacks sharing the buffers keep their row numbers)."""
    A = slot.A.new_zeros((slot.A.shape[0], rank, *slot.A.shape[2:]))
    B = slot.B.new_zeros((slot.B.shape[0], slot.B.shape[1], rank))
    with torch.no_grad():
        A[:, : slot.rank] = slot.A
        B[:, :, : slot.rank] = slot.B
    return _Slot(A, B, slot.own.clone(), *(None if t is None else t.clone() for t in (slot.mag, slot.eps, slot.dora)))


def _write(slot: _Slot, row: int, d: LowRank, dtype: torch.dtype, device: torch.device) -> None:
    r = d.rank
    slot.A[row].zero_()
    slot.B[row].zero_()
    slot.A[row, :r] = d.A.detach().to(device=device, dtype=dtype)
    slot.B[row, :, :r] = d.B.detach().reshape(d.B.shape[0], r).to(device=device, dtype=dtype)
    slot.own[row] = float(d.scale)
    if slot.dora is not None:
        assert slot.mag is not None and slot.eps is not None
        has = d.magnitude is not None
        slot.mag[row] = d.magnitude.detach().to(device=device, dtype=torch.float32) if d.magnitude is not None else 0.0
        slot.eps[row] = float(d.dora_eps) if has else 0.0
        slot.dora[row] = 1.0 if has else 0.0


def stack(adapters: Sequence[LoraAdapter] | Mapping[str, LoraAdapter], *, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None) -> AdapterStack:
    """Stack adapters for :func:`fvtransform.lora.call_batched`: position ``i`` is the ``i``-th adapter.

    Args:
        adapters: A sequence of adapters (named ``#0``, ``#1``, ...) or a mapping name -> adapter (in its order).
            Adapters may have different ranks and target different keys. Low-rank targets stack, DoRA ones
            too on linear weights (per-output-row magnitudes, as PEFT's); LoHa/LoKr, full deltas and DoRA on
            convolutions or per input column are refused (merge them, or run them alone with ``fvt.lora.call``).
        dtype: The factors' dtype in the stack; None: the promoted dtype of every adapter's factors. The call
            casts the gathered factors to the input's dtype, as ``fvt.lora.call`` does.
        device: Where the stack lives; None: the first adapter's device.

    Returns:
        An :class:`AdapterStack` with capacity for a few more adapters.

    Raises:
        UsageError: no adapters, a non-adapter, a target that does not stack, a repeated name, a non-floating dtype.
        ShapeMismatchError: two adapters give one key different shapes (they were made for different models).

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    >>> s = fvt.lora.stack([fvt.lora.random_adapter(tree, targets="*.weight", rank=r, seed=r) for r in (1, 2)])
    >>> len(s), s.ranks
    (2, {'l.weight': 2})
    """
    named: list[tuple[object, object]] | None = None
    if isinstance(adapters, Mapping) and not isinstance(adapters, LoraAdapter):  # an adapter is a mapping too
        named = list(adapters.items())
    elif isinstance(adapters, (list, tuple)):
        named = [(f"#{i}", a) for i, a in enumerate(adapters)]
    if named is None:
        raise UsageError(f"fvt.lora.stack takes a list of adapters or a dict name -> adapter; found {type(adapters).__name__}. "
                         "Fix: fvt.lora.stack([a, b]) or fvt.lora.stack({'style': a, 'motion': b})")
    if not named:
        raise UsageError("fvt.lora.stack: no adapters; a stack holds one or more. Fix: fvt.lora.stack([adapter, ...])")
    checked: list[tuple[str, dict[str, LowRank]]] = []
    for i, (name, adapter) in enumerate(named):
        if not isinstance(name, str):
            raise UsageError(f"fvt.lora.stack: adapter names must be strings; found {name!r} at position {i}")
        checked.append((name, _check_adapter(adapter, _label(i, name))))
    if len({n for n, _ in checked}) != len(checked):
        raise UsageError(f"fvt.lora.stack: adapter names must be distinct; found {[n for n, _ in checked]}")
    tensors = [t for _, ds in checked for d in ds.values() for t in (d.A, d.B)]
    if dtype is None:
        dtype = tensors[0].dtype if tensors else torch.float32
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"fvt.lora.stack: dtype must be a floating torch dtype; found {dtype!r}. Fix: dtype=torch.bfloat16")
    dev = torch.device(device) if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    capacity = max(2 * len(checked), _MIN_CAPACITY)
    slots: dict[str, _Slot] = {}
    ranks: dict[str, int] = {}
    first: dict[str, tuple[int, LowRank]] = {}
    for i, (name, ds) in enumerate(checked):
        for key, d in ds.items():
            if key in first:
                j, e = first[key]
                _check_fits(key, d, tuple(int(s) for s in e.A.shape[1:]), int(e.B.shape[0]), _label(i, name), [_label(j, checked[j][0])])
            else:
                first[key] = (i, d)
            ranks[key] = max(ranks.get(key, 0), d.rank)
    with torch.no_grad():
        for key, (_, d) in first.items():
            slots[key] = _empty(LowRank(d.A.new_empty((ranks[key], *d.A.shape[1:])), d.B.new_empty((d.B.shape[0], ranks[key])), 1.0),
                                capacity, dtype, dev)
        for key in {k for _, ds in checked for k, d in ds.items() if d.magnitude is not None}:
            slots[key] = slots[key].with_dora()
        for i, (_, ds) in enumerate(checked):
            for key, d in ds.items():
                _write(slots[key], i, d, dtype, dev)
    names = tuple(n for n, _ in checked)
    return AdapterStack(slots, tuple(range(len(checked))), _Rows(capacity, len(checked)), names, dtype, dev)
