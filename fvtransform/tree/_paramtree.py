"""ParamTree: an immutable, ordered mapping from dotted names to tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn

from fvtransform.errors import ImmutableError, UsageError
from fvtransform.tree import _pytree

__all__ = ["ParamTree", "state_keys", "human_bytes"]


_D = TypeVar("_D")

def human_bytes(n: int) -> str:
    """Format a byte count the way people read it.

    >>> human_bytes(1536)
    '1.5 KiB'
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def state_keys(module: nn.Module) -> dict[str, tuple[str, str]]:
    """Keys of a module's state (parameters and persistent buffers), in order.

    Returns ``{key: (kind, owner_path)}`` with kind ``"parameter"`` or
    ``"buffer"``. Tied parameters appear under every name they have, as in
    ``state_dict()``.
    """
    out: dict[str, tuple[str, str]] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, param in mod._parameters.items():
            if param is not None:
                out[prefix + name] = ("parameter", path)
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[prefix + name] = ("buffer", path)
    return out


class ParamTree(Mapping[str, torch.Tensor]):
    """An immutable, ordered ``Mapping[str, Tensor]`` keyed by state-dict names.

    Every operation returns a new tree and shares the tensors it did not
    change *by identity*; nothing mutates its input. Two keys may hold the
    same tensor object (tied weights): :meth:`aliases` lists such groups and
    every operation keeps them tied.

    ``==`` is exact value equality: the same keys (in any order) whose
    tensors have equal dtype, shape and *bits* (a NaN equals the same NaN;
    ``0.0`` and ``-0.0`` differ), which is what a round-trip test wants. It
    costs a read of every tensor of both trees (for a lazily loaded checkpoint,
    the whole file); keys, dtypes and shapes are compared first, so trees that
    differ there answer at once. Trees on the meta device hold no values:
    comparing them raises :class:`~fvtransform.errors.UsageError`; compare
    their structure with ``fvt.check`` instead. :meth:`same_order` also checks
    the order. Use ``torch.allclose`` per key for tolerance.

    Example:
        >>> import torch, fvtransform as fvt
        >>> t = fvt.ParamTree({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
        >>> t
        ParamTree(2 tensors, 32 B, float32: 2, devices: cpu)
        >>> list(t)
        ['w', 'b']
        >>> t["w"] = torch.ones(1)
        Traceback (most recent call last):
        ...
        fvtransform.errors.ImmutableError: ParamTree is immutable: cannot set 'w'. Build a new tree instead, e.g. fvt.update(tree, {'w': value}).
    """

    __slots__ = ("_data", "_slots")
    _data: dict[str, torch.Tensor]
    _slots: tuple[int, ...] | None  # leaf index per key, set when rebuilt by pytree unflatten

    def __init__(self, mapping: Mapping[str, torch.Tensor] | None = None, /) -> None:
        data: dict[str, torch.Tensor] = {}
        if isinstance(mapping, torch.nn.Module):
            raise UsageError(
                f"ParamTree(mapping) takes a mapping of str -> Tensor; found the module {type(mapping).__name__}. "
                "Read a module's parameters and buffers with fvt.ParamTree.from_module(module)"
            )
        if mapping is not None:
            items = mapping.items() if isinstance(mapping, Mapping) else mapping
            for key, value in items:
                if not isinstance(key, str):
                    raise UsageError(
                        f"ParamTree keys must be str; found {type(key).__name__} {key!r}. "
                        "Use dotted state-dict names such as 'blocks.0.attn1.to_q.weight'."
                    )
                if not isinstance(value, torch.Tensor):
                    fix = (
                        "Convert it with torch.as_tensor first."
                        if isinstance(value, (int, float, bool, list, tuple)) or hasattr(value, "__array__")
                        else "A LoRA adapter is not a tree: use the fvt.lora functions (fvt.lora.merge(tree, adapter), "
                        "fvt.lora.save(adapter, path)); fvt.select, fvt.drop, fvt.rename and fvt.map_tensors take an "
                        "adapter and return one (e.g. fvt.map_tensors(adapter, lambda t: t.to(torch.bfloat16)))."
                        if type(value).__module__.startswith("fvtransform.lora")
                        else "A ParamTree holds tensors only."
                    )
                    raise UsageError(
                        f"ParamTree values must be torch.Tensor; key {key!r} holds {type(value).__name__}. {fix}"
                    )
                data[key] = value
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_slots", None)

    @classmethod
    def _wrap(cls, data: dict[str, torch.Tensor]) -> ParamTree:
        """Build a tree from a dict this module owns (no validation, no copy)."""
        tree = object.__new__(cls)
        object.__setattr__(tree, "_data", data)
        object.__setattr__(tree, "_slots", None)
        return tree

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamTree:
        """The parameters and persistent buffers of ``module``, shared by identity.

        Tied weights appear under each of their names as the *same* tensor
        object, so they stay tied through every operation.

        >>> import torch, fvtransform as fvt
        >>> lin = torch.nn.Linear(3, 2)
        >>> t = fvt.ParamTree.from_module(lin)
        >>> list(t), t["weight"] is lin.weight
        (['weight', 'bias'], True)
        """
        data: dict[str, torch.Tensor] = {}
        for path, mod in module.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for name, param in mod._parameters.items():
                if param is not None:
                    data[prefix + name] = param
            for name, buf in mod._buffers.items():
                if buf is not None and name not in mod._non_persistent_buffers_set:
                    data[prefix + name] = buf
        return cls._wrap(data)

    # Mapping protocol -------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._data[key]
        except KeyError:
            from fvtransform.errors import KeyMismatchError
            from fvtransform._messages import close_matches

            hint = close_matches(key, self._data)
            raise KeyMismatchError(
                f"key {key!r} is not in this tree of {len(self._data)} tensors"
                + (f"; close matches: {hint}" if hint else "")
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: _D | None = None) -> torch.Tensor | _D | None:  # type: ignore[override]
        """``tree[key]``, or ``default`` when absent (a plain lookup: no close-name search for the error)."""
        return self._data.get(key, default)

    # Immutability ------------------------------------------------------------
    def __setitem__(self, key: str, value: Any) -> NoReturn:
        raise ImmutableError(
            f"ParamTree is immutable: cannot set {key!r}. "
            f"Build a new tree instead, e.g. fvt.update(tree, {{{key!r}: value}})."
        )

    def __delitem__(self, key: str) -> NoReturn:
        raise ImmutableError(
            f"ParamTree is immutable: cannot delete {key!r}. "
            f"Build a new tree instead, e.g. fvt.drop(tree, {key!r})."
        )

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise ImmutableError(f"ParamTree is immutable: cannot set attribute {name!r}.")

    def __delattr__(self, name: str) -> NoReturn:
        raise ImmutableError(f"ParamTree is immutable: cannot delete attribute {name!r}.")

    def __copy__(self) -> ParamTree:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ParamTree:
        import copy

        memo_t: dict[int, torch.Tensor] = {}
        data = {}
        for k, v in self._data.items():
            if id(v) not in memo_t:
                memo_t[id(v)] = copy.deepcopy(v, memo)
            data[k] = memo_t[id(v)]
        return ParamTree._wrap(data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ParamTree, (dict(self._data),))

    # Equality -------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if set(self._data) != set(other.keys()):
            return False
        if any(not isinstance(other[k], torch.Tensor) or v.dtype != other[k].dtype or v.shape != other[k].shape
               for k, v in self._data.items()):
            return False
        for k, v in self._data.items():
            w = other[k]
            if v is not w and "meta" in (v.device.type, w.device.type):
                raise UsageError(
                    f"ParamTree == needs tensor values, but {k!r} is on the meta device (it holds no data). "
                    "Compare structure with fvt.check(tree, other) (keys, shapes, dtypes), or load the values first."
                )
        return all(tensors_equal(v, other[k]) for k, v in self._data.items())

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def same_order(self, other: Mapping[str, torch.Tensor]) -> bool:
        """True when ``other`` has the same keys in the same order."""
        return list(self._data) == list(other.keys())

    # Facts -----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the distinct tensors of the tree (aliases counted once)."""
        seen: set[int] = set()
        total = 0
        for v in self._data.values():
            if id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
        return total

    def aliases(self) -> tuple[tuple[str, ...], ...]:
        """Groups of keys that hold the same tensor object (tied weights).

        >>> import torch, fvtransform as fvt
        >>> w = torch.zeros(2)
        >>> fvt.ParamTree({"a": w, "b": w, "c": torch.ones(1)}).aliases()
        (('a', 'b'),)
        """
        groups: dict[int, list[str]] = {}
        for k, v in self._data.items():
            groups.setdefault(id(v), []).append(k)
        return tuple(tuple(g) for g in groups.values() if len(g) > 1)

    def __repr__(self) -> str:
        seen: set[int] = set()
        dtypes: Counter[str] = Counter()
        devices: list[str] = []
        for v in self._data.values():
            if id(v) in seen:
                continue
            seen.add(id(v))
            dtypes[str(v.dtype).removeprefix("torch.")] += 1
            dev = str(v.device)
            if dev not in devices:
                devices.append(dev)
        dt = ", ".join(f"{d}: {n}" for d, n in dtypes.most_common())
        parts = [f"{len(self._data)} tensors", human_bytes(self.nbytes)]
        if dt:
            parts.append(dt)
        if devices:
            parts.append("devices: " + ", ".join(devices))
        n_alias = len(self.aliases())
        if n_alias:
            parts.append(f"{n_alias} tied groups")
        return "ParamTree(" + ", ".join(parts) + ")"

    # No operation methods: one spelling per operation -----------------------
    def __getattr__(self, name: str) -> NoReturn:
        eager = _OPERATIONS.get(name)
        if eager is not None:
            raise _NoMethodError(
                f"ParamTree has no method {name!r}: tree operations are functions. "
                f"Use fvt.{eager}(tree, ...) to run it now, or fvt.transforms.{eager}(...) as a step of fvt.chain."
            )
        raise AttributeError(f"'ParamTree' object has no attribute {name!r}")


#: Operation names a reader may look up on a tree -> the eager function that does it.
_OPERATIONS = {
    "select": "select",
    "drop": "drop",
    "partition": "partition",
    "combine": "combine",
    "rename": "rename",
    "cast": "cast",
    "to": "to",
    "map": "map_tensors",
    "map_tensors": "map_tensors",
    "update": "update",
}


class _NoMethodError(UsageError, AttributeError):
    """An operation looked up as a ParamTree method (an AttributeError, so ``hasattr`` stays False)."""


def tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors: same dtype, shape and bytes (NaN == NaN).

    >>> tensors_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    True
    >>> tensors_equal(torch.zeros(1), torch.zeros(1, dtype=torch.float64))
    False
    """
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        raise UsageError(
            "cannot compare the values of tensors on the meta device: they hold none. "
            "Compare dtype and shape instead, or load the values first."
        )
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype.is_floating_point or a.dtype.is_complex:
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        width = a.element_size()
        if a.dtype.is_complex:
            a, b = torch.view_as_real(a), torch.view_as_real(b)
            width //= 2
        a = a.contiguous().view(bits[width])
        b = b.contiguous().view(bits[width])
    return bool(torch.equal(a, b))


# pytree registration: leaves are the *distinct* tensors, so tied weights stay tied.
def _flatten(tree: ParamTree) -> tuple[list[torch.Tensor], tuple[tuple[str, ...], tuple[int, ...]]]:
    values = list(tree._data.values())
    if tree._slots is not None and not all(isinstance(v, torch.Tensor) for v in values):
        # A tree of non-tensor leaves (e.g. vmap's in_dims) keeps the structure it was built with.
        first: dict[int, Any] = {}
        for v, i in zip(values, tree._slots):
            first.setdefault(i, v)
        return [first[i] for i in range(len(first))], (tuple(tree._data), tree._slots)
    index: dict[int, int] = {}
    leaves: list[torch.Tensor] = []
    slots: list[int] = []
    for v in tree._data.values():
        slot = index.get(id(v))
        if slot is None:
            slot = index[id(v)] = len(leaves)
            leaves.append(v)
        slots.append(slot)
    return leaves, (tuple(tree._data), tuple(slots))


def _unflatten(leaves: Any, context: tuple[tuple[str, ...], tuple[int, ...]]) -> ParamTree:
    keys, slots = context
    leaves = list(leaves)
    tree = ParamTree._wrap({k: leaves[i] for k, i in zip(keys, slots)})
    object.__setattr__(tree, "_slots", tuple(slots))
    return tree


def _flatten_with_keys(tree: ParamTree) -> tuple[list[tuple[Any, torch.Tensor]], Any]:
    leaves, context = _flatten(tree)
    keys, slots = context
    first: dict[int, str] = {}
    for k, i in zip(keys, slots):
        first.setdefault(i, k)
    return [(_pytree.mapping_key(first[i]), leaf) for i, leaf in enumerate(leaves)], context


_pytree.register_node(
    ParamTree,
    _flatten,
    _unflatten,
    name="fvtransform.ParamTree",
    flatten_with_keys=_flatten_with_keys,
)
