"""Hypothesis strategies and law helpers for your own property tests of trees and LoRA.

Needs the ``test`` extra (``pip install 'fvtransform[test]'``): importing this module without Hypothesis raises
:class:`~fvtransform.errors.MissingDependencyError`. Every tensor a strategy makes comes from a
``torch.Generator`` seeded by a Hypothesis-drawn seed (never torch's global RNG), so examples replay and shrink.
Each drawn tree is noted (``hypothesis.note``) with its values, so a counterexample reads well.

>>> from hypothesis import given, settings, strategies as st
>>> from fvtransform.testing import adapters, assert_restores_exactly, trees
>>> @settings(max_examples=5, database=None)
... @given(trees(), st.data())
... def test_restore(tree, data):
...     assert_restores_exactly(tree, data.draw(adapters(tree)))
>>> test_restore()
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec, TypeVar

import torch

from fvtransform.errors import MissingDependencyError, UsageError

try:
    import hypothesis.strategies as st
    from hypothesis import note
except ModuleNotFoundError as e:  # pragma: no cover - exercised in a subprocess by tests/test_testing.py
    if e.name != "hypothesis":
        raise
    raise MissingDependencyError(
        "fvtransform.testing needs the package 'hypothesis', which is not installed. "
        "Install it with: pip install 'fvtransform[test]'"
    ) from e

from fvtransform.lora import FullDelta, LoraAdapter, LowRank, merge, merge_with_record, restore
from fvtransform.tree import ParamTree

__all__ = ["DTYPES", "adapters", "assert_no_mutation", "assert_order_independent", "assert_restores_exactly", "trees"]

#: The floating dtypes :func:`trees` draws from by default.
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_SEGMENT = r"[a-z]{1,4}|[0-9]"
#: Values shown per tensor in a drawn tree's note.
_NOTE_VALUES = 8


def _check_dtypes(dtypes: Sequence[torch.dtype], where: str) -> None:
    bad = [d for d in dtypes if not isinstance(d, torch.dtype) or not d.is_floating_point]
    if not dtypes or bad:
        raise UsageError(f"fvtransform.testing.{where}(dtypes=...) takes floating torch dtypes, got {list(dtypes)!r}; "
                         f"pass e.g. dtypes=(torch.float32, torch.bfloat16)")


def _describe(tree: Mapping[str, torch.Tensor]) -> str:
    """A tree with its values (the first few of each tensor), for counterexamples."""
    lines = []
    for key, t in tree.items():
        flat = t.detach().reshape(-1)[:_NOTE_VALUES].float().tolist()
        more = ", ..." if t.numel() > _NOTE_VALUES else ""
        lines.append(f"  {key}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)} "
                     f"[{', '.join(f'{v:.4g}' for v in flat)}{more}]")
    return "ParamTree(\n" + "\n".join(lines) + "\n)"


def trees(*, min_modules: int = 1, max_modules: int = 4, max_side: int = 6, dtypes: Sequence[torch.dtype] = DTYPES,
          zero_size: bool = True, tied: bool = True) -> st.SearchStrategy[ParamTree]:
    """Trees of ``<dotted.module>.weight`` (2-D) and optional ``.bias`` (1-D) tensors.

    The first module's weight is never empty nor overwritten by a tie, so :func:`adapters` always finds a target.

    Args:
        min_modules: Fewest modules (each has a ``weight``).
        max_modules: Most modules.
        max_side: Largest size of one dimension.
        dtypes: Floating dtypes to draw from, one per tensor.
        zero_size: Whether a dimension may be 0.
        tied: Whether two weights may share one tensor (a tied pair, as tied embeddings).

    Returns:
        A strategy of :class:`~fvtransform.tree.ParamTree`.

    Raises:
        UsageError: ``dtypes`` is empty or not floating, or the sizes are out of order.

    >>> from hypothesis import given, settings
    >>> from fvtransform.testing import trees
    >>> @settings(max_examples=5, database=None)
    ... @given(trees(max_modules=2))
    ... def test_names(tree):
    ...     assert all(k.endswith((".weight", ".bias")) for k in tree)
    >>> test_names()
    """
    _check_dtypes(dtypes, "trees")
    if not 1 <= min_modules <= max_modules or max_side < 1:
        raise UsageError(f"fvtransform.testing.trees: need 1 <= min_modules <= max_modules and max_side >= 1, got "
                         f"min_modules={min_modules}, max_modules={max_modules}, max_side={max_side}")
    names = st.from_regex(rf"({_SEGMENT})(\.({_SEGMENT})){{0,2}}", fullmatch=True).filter(lambda s: not s[0].isdigit())
    sides = st.integers(0 if zero_size else 1, max_side)
    nonempty = st.integers(1, max_side)

    @st.composite
    def draw_tree(draw: st.DrawFn) -> ParamTree:
        modules = draw(st.lists(names, min_size=min_modules, max_size=max_modules, unique=True)
                       .filter(lambda ms: not any(a != b and b.startswith(a + ".") for a in ms for b in ms)))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
        data: dict[str, torch.Tensor] = {}
        for i, m in enumerate(modules):
            out_f, in_f = draw(sides if i else nonempty), draw(sides if i else nonempty)
            dtype = draw(st.sampled_from(list(dtypes)))
            data[f"{m}.weight"] = torch.randn(out_f, in_f, generator=g).to(dtype)
            if draw(st.booleans()):
                data[f"{m}.bias"] = torch.randn(out_f, generator=g).to(dtype)
        weights = [f"{m}.weight" for m in modules]
        if tied and len(weights) > 1 and draw(st.booleans()):  # one weight shares another's tensor
            dst = draw(st.sampled_from(weights[1:]))
            src = draw(st.sampled_from([k for k in weights if k != dst]))
            data[dst] = data[src]
        tree = ParamTree(data)
        note(_describe(tree))
        return tree

    return draw_tree()


def adapters(tree: Mapping[str, torch.Tensor], *, max_rank: int = 4, full_deltas: bool = False,
             min_targets: int = 1) -> st.SearchStrategy[LoraAdapter]:
    """LoRA adapters that fit ``tree``: low rank on its 2-D weights, optionally full deltas on any tensor.

    Targets are distinct tensors (one key of a tied pair) with at least one element. Factors are float32, drawn
    from a seeded generator; scales lie in [-2, 2]. Draw several for a set: ``st.lists(adapters(tree))``.

    Args:
        tree: The tree the adapters must fit.
        max_rank: Largest rank of a low-rank delta.
        full_deltas: Whether a target may get a full-size delta (``.diff``) instead of a low-rank one.
        min_targets: Fewest targets (0 allows an empty adapter).

    Returns:
        A strategy of :class:`~fvtransform.lora.LoraAdapter`.

    Raises:
        UsageError: ``tree`` has fewer than ``min_targets`` tensors an adapter can target.

    >>> import torch
    >>> import fvtransform as fvt
    >>> from fvtransform.testing import adapters
    >>> from hypothesis import given, settings
    >>> tree = fvt.ParamTree({"l.weight": torch.ones(3, 2)})
    >>> @settings(max_examples=5, database=None)
    ... @given(adapters(tree))
    ... def test_targets(adapter):
    ...     assert list(adapter) == ["l.weight"]
    >>> test_targets()
    """
    if max_rank < 1 or min_targets < 0:
        raise UsageError(f"fvtransform.testing.adapters: need max_rank >= 1 and min_targets >= 0, got "
                         f"max_rank={max_rank}, min_targets={min_targets}")
    seen: set[int] = set()
    eligible: list[str] = []
    for key, t in tree.items():
        if id(t) in seen or t.numel() == 0 or not t.is_floating_point() or (t.dim() != 2 and not full_deltas):
            continue
        seen.add(id(t))
        eligible.append(key)
    if len(eligible) < min_targets:
        raise UsageError(f"fvtransform.testing.adapters: the tree has {len(eligible)} targetable tensors "
                         f"({eligible}), fewer than min_targets={min_targets}; draw trees with zero_size=False, "
                         f"pass full_deltas=True, or lower min_targets")
    shapes = {k: tuple(tree[k].shape) for k in eligible}

    @st.composite
    def draw_adapter(draw: st.DrawFn) -> LoraAdapter:
        keys = draw(st.lists(st.sampled_from(eligible), min_size=min_targets, max_size=len(eligible), unique=True)
                    if eligible else st.just([]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
        targets: dict[str, LowRank | FullDelta] = {}
        for key in sorted(keys):
            shape = shapes[key]
            scale = draw(st.floats(-2, 2, allow_nan=False, width=32))
            if len(shape) != 2 or (full_deltas and draw(st.booleans())):
                targets[key] = FullDelta(torch.randn(shape, generator=g) * 0.3, scale)
            else:
                r = draw(st.integers(1, max_rank))
                targets[key] = LowRank(torch.randn(r, shape[1], generator=g) * 0.3,
                                       torch.randn(shape[0], r, generator=g) * 0.3, scale)
        return LoraAdapter(targets)

    return draw_adapter()


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
            return f"{key!r}: values differ bitwise (expected {_describe({key: w})}, found {_describe({key: g})})"
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
