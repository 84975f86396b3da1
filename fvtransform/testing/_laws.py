"""Law helpers: merge/restore exactness, no mutation, order independence (see :mod:`fvtransform.testing`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec, TypeVar

import torch

from fvtransform.errors import UsageError
from fvtransform.lora import LoraAdapter, merge, merge_with_record, restore
from fvtransform.testing._strategies import describe

__all__ = ["assert_no_mutation", "assert_order_independent", "assert_restores_exactly"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy whose equality is bit equality (NaNs and signed zeros included)."""
    c = t.detach().clone()
    return c.view(torch.uint8) if c.dim() > 0 and c.element_size() > 0 else c


def _first_difference(want: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    if set(want) != set(got):
        return f"keys differ: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    for key, w in want.items():
        g = got[key]
        if w.dtype != g.dtype or w.shape != g.shape:
            return f"{key!r}: expected {w.dtype}{list(w.shape)}, found {g.dtype}{list(g.shape)}"
        if not torch.equal(_bits(w), _bits(g)):
            return f"{key!r}: values differ bitwise (expected {describe({key: w})}, found {describe({key: g})})"
    return None


def assert_restores_exactly(tree: Mapping[str, torch.Tensor], adapter: LoraAdapter, scale: float = 1.0) -> None:
    """Assert that merging ``adapter`` with a record and restoring gives ``tree`` back, bit for bit.

    Args:
        tree: The base tree.
        adapter: The adapter to merge.
        scale: The merge's scale.

    Raises:
        AssertionError: The restored tree differs; the message names the first differing key.

    >>> import torch
    >>> import fvtransform as fvt
    >>> from fvtransform.lora import LoraAdapter, LowRank
    >>> from fvtransform.testing import assert_restores_exactly
    >>> tree = fvt.ParamTree({"l.weight": torch.ones(2, 2)})
    >>> assert_restores_exactly(tree, LoraAdapter({"l.weight": LowRank(torch.ones(1, 2), torch.ones(2, 1), 0.3)}))
    """
    merged, record = merge_with_record(tree, adapter, scale)
    problem = _first_difference(tree, restore(merged, record))
    if problem is not None:
        raise AssertionError(f"restore(merge_with_record(tree, adapter, {scale:g})) is not the tree: {problem}")


def assert_no_mutation(fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """Call ``fn(*args, **kwargs)`` and assert it changed no tensor it was given (in trees, adapters or bare).

    Checks both the values (bitwise) and torch's in-place version counters, so a write of the same values counts.

    Args:
        fn: The function under test, e.g. ``fvt.lora.merge``.
        *args: Its positional arguments (trees, adapters, tensors, lists of them).
        **kwargs: Its keyword arguments.

    Returns:
        What ``fn`` returned.

    Raises:
        AssertionError: A tensor argument changed; the message names where.

    >>> import torch
    >>> import fvtransform as fvt
    >>> from fvtransform.testing import assert_no_mutation
    >>> tree = fvt.ParamTree({"w": torch.ones(2)})
    >>> assert_no_mutation(fvt.cast, tree, torch.float16)["w"].dtype
    torch.float16
    """
    watched = list(_tensors_in((args, kwargs), "args"))
    before = [(where, t, t._version, _bits(t)) for where, t in watched]
    result = fn(*args, **kwargs)
    for where, t, version, bits in before:
        if t._version != version or not torch.equal(_bits(t), bits):
            raise AssertionError(f"{getattr(fn, '__name__', fn)!s} mutated its input {where} "
                                 f"({t.dtype}{list(t.shape)}); it must return new tensors instead")
    return result


def _tensors_in(obj: object, where: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(where, obj)]
    if isinstance(obj, LoraAdapter):
        return [(f"{where}[{k!r}]", t) for k, d in obj.items() for t in d.tensors()]
    if isinstance(obj, Mapping):
        return [x for k, v in obj.items() for x in _tensors_in(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _tensors_in(v, f"{where}[{i}]")]
    return []


def assert_order_independent(tree: Mapping[str, torch.Tensor], adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
    """Assert that merging a set of ``(adapter, scale)`` pairs gives the same tree, bit for bit, in every order.

    Args:
        tree: The base tree.
        adapters: The pairs; up to 5 (every permutation is merged).

    Raises:
        AssertionError: Two orders differ; the message names the orders and the first differing key.
        UsageError: More than 5 pairs.

    >>> import torch
    >>> import fvtransform as fvt
    >>> from fvtransform.lora import LoraAdapter, FullDelta
    >>> from fvtransform.testing import assert_order_independent
    >>> tree = fvt.ParamTree({"w": torch.ones(2)})
    >>> assert_order_independent(tree, [(LoraAdapter({"w": FullDelta(torch.ones(2))}), 0.5)] * 2)
    """
    pairs = list(adapters)
    if len(pairs) > 5:
        raise UsageError(f"fvtransform.testing.assert_order_independent: {len(pairs)} pairs make too many orders; "
                         f"pass at most 5 (e.g. pairs[:5])")
    first = merge(tree, pairs)
    for order in itertools.islice(itertools.permutations(range(len(pairs))), 1, None):
        problem = _first_difference(first, merge(tree, [pairs[i] for i in order]))
        if problem is not None:
            raise AssertionError(f"merging in order {list(order)} differs from order {list(range(len(pairs)))}: "
                                 f"{problem}")
