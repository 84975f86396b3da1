"""Hypothesis strategies for trees and the LoRA adapters that fit them (see :mod:`fvtransform.testing`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import TYPE_CHECKING

import torch

from fvtransform.errors import UsageError
from fvtransform.lora import Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._adapter import LoHa, LoKr
from fvtransform.tree import ParamTree

if TYPE_CHECKING:  # Hypothesis comes with the test extra: imported where a strategy is built, never at import time
    import hypothesis.strategies as st

__all__ = ["DTYPES", "adapters", "describe", "trees"]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""The floating dtypes ``trees()`` draws from by default."""

_SEGMENT = r"[a-z]{1,4}|[0-9]"
#: Values shown per tensor in a drawn tree's note.
_NOTE_VALUES = 8


def _check_dtypes(dtypes: Sequence[torch.dtype], where: str) -> None:
    bad = [d for d in dtypes if not isinstance(d, torch.dtype) or not d.is_floating_point]
    if not dtypes or bad:
        raise UsageError(f"fvtransform.testing.{where}(dtypes=...) takes floating torch dtypes, got {list(dtypes)!r}; "
                         f"pass e.g. dtypes=(torch.float32, torch.bfloat16)")


def describe(tree: Mapping[str, torch.Tensor]) -> str:
    """A tree with its values (the first few of each tensor), for counterexamples."""
    lines = []
    for key, t in tree.items():
        flat = t.detach().reshape(-1)[:_NOTE_VALUES].float().tolist()
        more = ", ..." if t.numel() > _NOTE_VALUES else ""
        lines.append(f"  {key}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)} "
                     f"[{', '.join(f'{v:.4g}' for v in flat)}{more}]")
    return "ParamTree(\n" + "\n".join(lines) + "\n)"


def trees(*, min_modules: int = 1, max_modules: int = 4, max_side: int = 6, dtypes: Sequence[torch.dtype] = DTYPES,
          zero_size: bool = True, tied: bool = True, conv: bool = False) -> st.SearchStrategy[ParamTree]:
    """Trees of ``<dotted.module>.weight`` (2-D, or 4-D conv) and optional ``.bias`` (1-D) tensors.

    Any floating dtype may be drawn, float8 included (``dtypes=(torch.float8_e4m3fn,)``: values drawn in
    float32 and rounded by ``Tensor.to``, without a scale, as a raw float8 tree).

    The first module's weight is never empty nor overwritten by a tie, so :func:`adapters` always finds a target.

    Args:
        min_modules: Fewest modules (each has a ``weight``).
        max_modules: Most modules.
        max_side: Largest size of one dimension.
        dtypes: Floating dtypes to draw from, one per tensor.
        zero_size: Whether a dimension may be 0.
        tied: Whether two weights may share one tensor (a tied pair, as tied embeddings).
        conv: Whether a weight may be a conv kernel ``[out, in, k, k]`` (``k`` from 1 to 3).

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
    import hypothesis.strategies as st
    from hypothesis import note

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
            kernel = (draw(st.integers(1, 3)),) * 2 if conv and draw(st.booleans()) else ()
            dtype = draw(st.sampled_from(list(dtypes)))
            data[f"{m}.weight"] = torch.randn(out_f, in_f, *kernel, generator=g).to(dtype)
            if draw(st.booleans()):
                data[f"{m}.bias"] = torch.randn(out_f, generator=g).to(dtype)
        weights = [f"{m}.weight" for m in modules]
        if tied and len(weights) > 1 and draw(st.booleans()):  # one weight shares another's tensor
            dst = draw(st.sampled_from(weights[1:]))
            src = draw(st.sampled_from([k for k in weights if k != dst]))
            data[dst] = data[src]
        tree = ParamTree(data)
        note(describe(tree))
        return tree

    return draw_tree()


def adapters(tree: Mapping[str, torch.Tensor], *, max_rank: int = 4, full_deltas: bool = False,
             min_targets: int = 1, dora: bool = False, lycoris: bool = False) -> st.SearchStrategy[LoraAdapter]:
    """LoRA adapters that fit ``tree``: low rank on its 2-D and conv weights, optionally DoRA, LoHa/LoKr, full deltas.

    Targets are distinct tensors (one key of a tied pair) with at least one element. Factors are float32, drawn
    from a seeded generator; scales lie in [-2, 2]. A conv weight ``[out, in, k...]`` gets ``A [r, in, k...]``
    and ``B [out, r, 1...]``. Draw several for a set: ``st.lists(adapters(tree))``.

    Args:
        tree: The tree the adapters must fit.
        max_rank: Largest rank of a low-rank delta.
        full_deltas: Whether a target may get a full-size delta (``.diff``) instead of a low-rank one.
        min_targets: Fewest targets (0 allows an empty adapter).
        dora: Whether a low-rank target may carry a DoRA magnitude (``[out]``, positive).
        lycoris: Whether a weight may get a LyCORIS LoHa or LoKr delta (plain factors, no Tucker).

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
    import hypothesis.strategies as st

    if max_rank < 1 or min_targets < 0:
        raise UsageError(f"fvtransform.testing.adapters: need max_rank >= 1 and min_targets >= 0, got "
                         f"max_rank={max_rank}, min_targets={min_targets}")
    seen: set[int] = set()
    eligible: list[str] = []
    for key, t in tree.items():
        if id(t) in seen or t.numel() == 0 or not t.is_floating_point() or (t.dim() < 2 and not full_deltas):
            continue
        seen.add(id(t))
        eligible.append(key)
    if len(eligible) < min_targets:
        raise UsageError(f"fvtransform.testing.adapters: the tree has {len(eligible)} targetable tensors "
                         f"({eligible}), fewer than min_targets={min_targets}; draw trees with zero_size=False, "
                         f"pass full_deltas=True, or lower min_targets")
    shapes = {k: tuple(tree[k].shape) for k in eligible}
    kinds = ["lowrank"] + ["full"] * full_deltas + ["dora"] * dora + ["loha", "lokr"] * lycoris

    @st.composite
    def draw_adapter(draw: st.DrawFn) -> LoraAdapter:
        keys = draw(st.lists(st.sampled_from(eligible), min_size=min_targets, max_size=len(eligible), unique=True)
                    if eligible else st.just([]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
        targets: dict[str, Delta] = {}
        for key in sorted(keys):
            shape = shapes[key]
            scale = draw(st.floats(-2, 2, allow_nan=False, width=32))
            kind = "full" if len(shape) < 2 else draw(st.sampled_from(kinds))
            if kind == "full":
                targets[key] = FullDelta(torch.randn(shape, generator=g) * 0.3, scale)
                continue
            r = draw(st.integers(1, max_rank))
            out_f, cols = shape[0], math.prod(shape[1:])
            if kind == "loha":
                w = [torch.randn(s, generator=g) * 0.3 for s in ((out_f, r), (r, cols), (out_f, r), (r, cols))]
                targets[key] = LoHa(w[0], w[1], w[2], w[3], scale=scale)
            elif kind == "lokr":
                a, c = draw(st.sampled_from(_divisors(out_f))), draw(st.sampled_from(_divisors(shape[1])))
                b, d = out_f // a, cols // c
                targets[key] = LoKr(w1=torch.randn(a, c, generator=g) * 0.3, w2_a=torch.randn(b, r, generator=g) * 0.3,
                                    w2_b=torch.randn(r, d, generator=g) * 0.3, scale=scale)
            else:
                A = torch.randn(r, *shape[1:], generator=g) * 0.3
                B = (torch.randn(out_f, r, generator=g) * 0.3).reshape(out_f, r, *(1,) * (len(shape) - 2))
                magnitude = torch.rand(out_f, generator=g) + 0.5 if kind == "dora" else None
                targets[key] = LowRank(A, B, scale, magnitude=magnitude)
        return LoraAdapter(targets)

    return draw_adapter()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
