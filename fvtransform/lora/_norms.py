"""How much an update changes each weight: ``||dW|| / ||W||`` per key, laid out as blocks x modules.

One function, :func:`update_norms`, gives the numbers of ``fvtransform inspect LORA --base BASE --plot`` and
``fvtransform diff A B`` (both drawn by :mod:`fvtransform.cli._plot`). The block / module split of a key is
read through a table of layouts (:data:`LAYOUTS`): the repeated-block container and index (``blocks.3``,
``transformer_blocks.3``), the rest of the key is the module (``attn1.to_q``), ordered as its layout lists it.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import re
import types

import attrs
import torch

from fvtransform._args import check_strict
from fvtransform._messages import format_keys
from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError

__all__ = ["LAYOUTS", "Layout", "UpdateNorms", "split_block", "update_norms"]


@attrs.frozen
class Layout:
    """A model family's key layout: where its repeated blocks are, and the order of a block's modules.

    Attributes:
        name: for the plot's title and the JSON output.
        block: a regex whose match ends just after a block's index (group 1 is the index).
        modules: a block's modules (key minus the block prefix, minus ``.weight``), in the order to draw them.
    """

    name: str
    block: re.Pattern[str]
    modules: tuple[str, ...]


def _layout(name: str, block: str, modules: str) -> Layout:
    return Layout(name, re.compile(block), tuple(modules.split()))


_BLOCKS = r"(?:^|\.)blocks\.(\d+)\."
#: Known layouts, tried in order; the one whose modules name the most keys gives the column order. A key in
#: none of them still gets a row from the generic block pattern of the last entry.
LAYOUTS: tuple[Layout, ...] = (
    _layout("diffusers Wan", _BLOCKS,
            "attn1.to_q attn1.to_k attn1.to_v attn1.to_out.0 attn1.norm_q attn1.norm_k "
            "attn2.to_q attn2.to_k attn2.to_v attn2.to_out.0 attn2.add_k_proj attn2.add_v_proj attn2.norm_q "
            "attn2.norm_k attn2.norm_added_k ffn.net.0.proj ffn.net.2 norm2 scale_shift_table"),
    _layout("original Wan", _BLOCKS,
            "self_attn.q self_attn.k self_attn.v self_attn.o self_attn.norm_q self_attn.norm_k "
            "cross_attn.q cross_attn.k cross_attn.v cross_attn.o cross_attn.k_img cross_attn.v_img "
            "cross_attn.norm_q cross_attn.norm_k cross_attn.norm_k_img ffn.0 ffn.2 norm3 modulation"),
    _layout("diffusers transformer blocks", r"(?:^|\.)(?:single_)?transformer_blocks\.(\d+)\.",
            "attn.to_q attn.to_k attn.to_v attn.to_out.0 attn.add_q_proj attn.add_k_proj attn.add_v_proj "
            "attn.to_add_out ff.net.0.proj ff.net.2 ff_context.net.0.proj ff_context.net.2 proj_mlp proj_out"),
    _layout("repeated blocks", r"(?:^|\.)(?:blocks|layers|double_blocks|single_blocks|h)\.(\d+)\.", ""),
)


def split_block(key: str, layouts: tuple[Layout, ...] = LAYOUTS) -> tuple[str, str] | None:
    """``(block, module)`` of a key, e.g. ``("blocks.3", "attn1.to_q")``; None for a key outside the blocks.

    The block keeps what precedes it (``transformer.blocks.3``); the module drops a trailing ``.weight``.

    >>> split_block("blocks.3.attn1.to_q.weight")
    ('blocks.3', 'attn1.to_q')
    >>> split_block("transformer_blocks.0.attn.to_out.0.bias")
    ('transformer_blocks.0', 'attn.to_out.0.bias')
    >>> split_block("patch_embedding.weight") is None
    True
    """
    for layout in layouts:
        m = layout.block.search(key)
        if m:
            return key[: m.end() - 1].lstrip("."), key[m.end():].removesuffix(".weight")
    return None


def _block_order(block: str) -> tuple[str, int]:
    m = re.search(r"(\d+)$", block)
    return (block[: m.start()], int(m.group(1))) if m else (block, -1)


def _read_only(values: Mapping[str, float]) -> Mapping[str, float]:
    return types.MappingProxyType(dict(values))


@attrs.frozen
class UpdateNorms:
    """The relative update size ‖ΔW‖ / ‖W‖ (Frobenius) of each changed weight, and its blocks x modules grid.

    Attributes:
        by_key: each changed (or LoRA-targeted) key -> its relative update size, in the base's key order.
            A zero base weight with a nonzero update gives ``inf``.
        rows: every block of the base (``blocks.0``, ...), in index order.
        columns: the changed modules and every matrix weight of a block (``attn1.to_q``: blank where
            untouched), in the layout's order, then the others sorted.
        grid: ``grid[i][j]``: the value of module ``columns[j]`` of block ``rows[i]``; ``nan`` where it was not
            changed (drawn blank) and where the update holds NaN (drawn apart: see :meth:`changed_cells`).
        outside: changed keys outside the blocks (``patch_embedding.weight``): in ``by_key``, not in the grid.
        layout: the name of the layout whose modules matched the most keys.
        unchanged: how many common keys did not change (or are not targeted).
        leftovers: keys present on only one side (``strict=False``), as ``(side, key)`` pairs.
    """

    by_key: Mapping[str, float] = attrs.field(converter=_read_only)
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    grid: tuple[tuple[float, ...], ...]
    outside: tuple[str, ...]
    layout: str
    unchanged: int
    leftovers: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: an untouched grid cell as None; a changed value ``inf`` or ``nan`` as that string."""
        def num(x: float) -> float | str:
            return "nan" if math.isnan(x) else "inf" if math.isinf(x) else x

        changed = self.changed_cells()
        grid = [[num(x) if (i, j) in changed else None for j, x in enumerate(row)] for i, row in enumerate(self.grid)]
        return {"layout": self.layout, "rows": list(self.rows), "columns": list(self.columns),
                "grid": grid, "by_key": {k: num(v) for k, v in self.by_key.items()},
                "outside": list(self.outside), "unchanged": self.unchanged,
                "leftovers": [{"side": s, "key": k} for s, k in self.leftovers]}


    def changed_cells(self) -> frozenset[tuple[int, int]]:
        """The ``(row, column)`` indices of the grid's changed cells (a NaN there is a changed value, not a blank)."""
        rows = {r: i for i, r in enumerate(self.rows)}
        columns = {c: j for j, c in enumerate(self.columns)}
        cells = (split_block(k) for k in self.by_key)
        return frozenset((rows[w[0]], columns[w[1]]) for w in cells if w is not None and w[0] in rows and w[1] in columns)


def _ratio(delta: torch.Tensor, weight: torch.Tensor) -> float:
    dn = float(torch.linalg.vector_norm(delta.double()))
    wn = float(torch.linalg.vector_norm(weight.double()))
    return dn / wn if wn > 0 else (0.0 if dn == 0 else math.inf)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (a NaN equals the same NaN); another dtype is never the same bits."""
    if a.dtype != b.dtype:
        return False
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(flat_a, flat_b)
    return torch.equal(flat_a.contiguous().view(torch.uint8), flat_b.contiguous().view(torch.uint8))


def _as_float64(tree: Mapping[str, torch.Tensor], key: str, side: str) -> torch.Tensor:
    """``tree[key]`` in float64: plain float8 dequantised (no scale), integers and bools as numbers.

    Raises:
        UsageError: a scaled float8 weight (its ``scale_weight`` is in the tree: run fvt.dequantize first), or a
            complex or float8 dtype fvtransform does not read.
    """
    from fvtransform._fp8 import dequantize_tensor, is_fp8, is_other_float8, scale_key

    t = tree[key].detach()
    if is_fp8(t.dtype):
        scaled = key.endswith("weight") and scale_key(key) in tree
        if scaled:
            raise UsageError(f"fvt.lora.update_norms: {key!r} in {side} is a scaled float8 weight (its "
                             f"{scale_key(key)!r} is in the tree); compare the real weights: "
                             f"fvt.lora.update_norms(fvt.dequantize(base), fvt.dequantize(other))")
        return dequantize_tensor(t, None, torch.float32).double()
    if t.is_complex() or is_other_float8(t.dtype):
        raise UsageError(f"fvt.lora.update_norms: {key!r} in {side} has dtype {str(t.dtype).removeprefix('torch.')}, "
                         f"which has no relative update size here; compare real floating, float8 or integer tensors")
    return t.double()


def _lora_deltas(base: Mapping[str, torch.Tensor], adapter: object) -> dict[str, float]:
    from fvtransform.lora._adapter import LoraAdapter
    from fvtransform.lora._merge import merge
    from fvtransform.tree._paramtree import ParamTree

    assert isinstance(adapter, LoraAdapter)
    out: dict[str, float] = {}
    for key in adapter:
        w = base[key].detach().to(torch.float32)  # merged in float32, one target at a time: the update itself
        merged = merge(ParamTree({key: w}), LoraAdapter({key: adapter[key]}))[key]
        out[key] = _ratio(merged.detach() - w, w)
    return out


def update_norms(base: Mapping[str, torch.Tensor], other: object, *, strict: bool = True) -> UpdateNorms:
    """What ``other`` changes in ``base``: the relative update size ‖ΔW‖ / ‖W‖ per key, and per block and module.

    ``other`` is a :class:`~fvtransform.lora.LoraAdapter` (its update at scale 1, merged in float32 one
    target at a time; untargeted keys are unchanged) or a second tree of the same keys (a fine-tune, a
    merged checkpoint: ``dW = other - base`` in float64, plain float8 dequantised and integer tensors as
    numbers; keys equal bit for bit, NaNs included, are unchanged). A scaled float8 tree is refused:
    compare ``fvt.dequantize(tree)``. Nothing is mutated; lazy trees are read one tensor at a time.

    Args:
        base: the weights before (a ParamTree or any ``Mapping[str, Tensor]``).
        other: a LoraAdapter resolved against ``base``, or the weights after.
        strict: both sides hold the same keys (for a tree), every target is in ``base`` (for an adapter).
            ``strict=False`` skips the keys of one side only and lists them in ``leftovers``.

    Returns:
        An :class:`UpdateNorms`.

    Raises:
        KeyMismatchError: ``strict=True`` and a key is on one side only (the message names them).
        ShapeMismatchError: a common key has another shape on each side.
        UsageError: ``other`` is neither an adapter nor a mapping of tensors; a weight is scaled float8
            (pass ``fvt.dequantize(tree)``) or complex.

    >>> import torch, fvtransform as fvt
    >>> base = fvt.ParamTree({"blocks.0.attn1.to_q.weight": torch.ones(2, 2), "blocks.0.attn1.to_k.weight": torch.ones(2, 2)})
    >>> after = fvt.update(base, {"blocks.0.attn1.to_q.weight": torch.full((2, 2), 1.5)})
    >>> n = fvt.lora.update_norms(base, after)
    >>> n.by_key["blocks.0.attn1.to_q.weight"], n.rows, n.columns, n.grid
    (0.5, ('blocks.0',), ('attn1.to_q', 'attn1.to_k'), ((0.5, nan),))
    """
    from fvtransform.lora._adapter import LoraAdapter

    strict = check_strict(strict, "fvt.lora.update_norms")
    leftovers: list[tuple[str, str]] = []
    if isinstance(other, LoraAdapter):
        missing = [k for k in other if k not in base]
        if missing and strict:
            raise KeyMismatchError(f"fvt.lora.update_norms: the adapter targets {len(missing)} keys the base lacks: "
                                   f"{format_keys(missing)}; resolve it against this base (fvt.lora.load(path, base=base)) "
                                   f"or pass strict=False to skip them")
        leftovers += [("adapter", k) for k in missing]
        values = _lora_deltas(base, LoraAdapter({k: other[k] for k in other if k in base}))
        values = {k: values[k] for k in base if k in values}
        unchanged = len(base) - len(values)
    elif isinstance(other, Mapping):
        only_a = [k for k in base if k not in other]
        only_b = [k for k in other if k not in base]
        if (only_a or only_b) and strict:
            raise KeyMismatchError(f"fvt.lora.update_norms: the two trees hold different keys: only in base "
                                   f"{format_keys(only_a)}, only in other {format_keys(only_b)}; compare checkpoints of "
                                   f"one model, or pass strict=False to skip and list them")
        leftovers += [("base", k) for k in only_a] + [("other", k) for k in only_b]
        values, unchanged = {}, 0
        for k in base:
            if k not in other:
                continue
            a, b = base[k], other[k]
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise UsageError(f"fvt.lora.update_norms: {k!r} is not a tensor on both sides "
                                 f"({type(a).__name__}, {type(b).__name__}); pass two Mapping[str, Tensor]")
            if a.shape != b.shape:
                raise ShapeMismatchError(f"fvt.lora.update_norms: {k!r} has shape {list(a.shape)} in base and "
                                         f"{list(b.shape)} in other; compare checkpoints of one architecture")
            if _same_bits(a, b):
                unchanged += 1
                continue
            wa, wb = _as_float64(base, k, "base"), _as_float64(other, k, "other")
            values[k] = _ratio(wb - wa, wa)
    else:
        raise UsageError(f"fvt.lora.update_norms(base, other): other must be a LoraAdapter or a Mapping[str, Tensor]; "
                         f"found {type(other).__name__}. Fix: fvt.lora.update_norms(base, fvt.lora.load(path, base=base))")
    # the frame: every block of the base, and every matrix weight of a block as a column (blank where untouched)
    frame = [where for k in base if (where := split_block(k)) is not None and (k in values or _is_matrix(base, k))]
    return _grid(values, frame, unchanged, leftovers)


def _is_matrix(tree: Mapping[str, torch.Tensor], key: str) -> bool:
    t = tree[key]
    return key.endswith(".weight") and isinstance(t, torch.Tensor) and t.ndim >= 2


def _grid(values: dict[str, float], frame: list[tuple[str, str]], unchanged: int,
          leftovers: list[tuple[str, str]]) -> UpdateNorms:
    cells: dict[tuple[str, str], float] = {}
    outside: list[str] = []
    for key, v in values.items():
        where = split_block(key)
        if where is None:
            outside.append(key)
        else:
            cells[where] = v
    modules = {m for _, m in cells} | {m for _, m in frame}
    layout = max(LAYOUTS, key=lambda lay: len(modules & set(lay.modules)))  # first of the best (max is stable)
    known = [m for m in layout.modules if m in modules]
    columns = tuple(known + sorted(modules - set(known)))
    rows = tuple(sorted({b for b, _ in cells} | {b for b, _ in frame}, key=_block_order))
    grid = tuple(tuple(cells.get((r, c), math.nan) for c in columns) for r in rows)
    return UpdateNorms(values, rows, columns, grid, tuple(outside), layout.name if known else "repeated blocks",
                       unchanged, tuple(leftovers))
