"""``fvt.check``: every difference between a tree and what a module expects, at once."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
from torch import nn

from fvtransform._args import check_strict
from fvtransform._messages import format_keys
from fvtransform.errors import FvTransformError, KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.tree._paramtree import ParamTree

__all__ = ["CheckReport", "check", "compare"]


@attrs.frozen
class CheckReport:
    """What differs: missing and unexpected keys, shape and dtype mismatches (sorted)."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    dtype_mismatches: tuple[tuple[str, torch.dtype, torch.dtype], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches or self.dtype_mismatches)

    def __str__(self) -> str:
        if self.ok:
            return "tree matches"
        lines = []
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {format_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {format_keys(self.unexpected)}")
        for k, exp, got in self.shape_mismatches:
            lines.append(f"shape of {k!r}: expected {list(exp)}, found {list(got)}")
        for k, want, found in self.dtype_mismatches:
            lines.append(f"dtype of {k!r}: expected {want}, found {found}")
        return "\n".join(lines)


def check(
    tree: Mapping[str, torch.Tensor],
    module_or_tree: nn.Module | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    dtypes: bool = False,
) -> CheckReport:
    """Compare ``tree`` with a module's state (or another tree): keys, shapes and, with ``dtypes=True``, dtypes.

    Every difference is reported at once, and the result is always the
    :class:`CheckReport`. ``strict`` concerns keys only, as in
    ``load_state_dict``: with ``strict=True`` a missing or unexpected key
    raises :class:`KeyMismatchError`; with ``strict=False`` they are listed
    in the report. A shape mismatch (and, with ``dtypes=True``, a dtype
    mismatch) always raises :class:`ShapeMismatchError`; the error carries the
    full report as ``.report``.

    >>> import torch, fvtransform as fvt
    >>> lin = torch.nn.Linear(3, 2)
    >>> fvt.check({"weight": torch.zeros(2, 3)}, lin, strict=False).missing
    ('bias',)
    >>> print(fvt.check({"weight": torch.zeros(2, 3)}, lin, strict=False))
    missing (1): ['bias']
    >>> fvt.check({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, lin, strict=False)
    Traceback (most recent call last):
    ...
    fvtransform.errors.ShapeMismatchError: tree does not match:
    shape of 'weight': expected [2, 3], found [2, 4]
    Fix: load the matching checkpoint, or reshape or drop the key (fvt.map_tensors / fvt.drop).
    """
    strict = check_strict(strict, "fvt.check")
    if isinstance(tree, nn.Module) or (isinstance(module_or_tree, Mapping) and not isinstance(tree, Mapping)):
        raise UsageError(
            f"fvt.check(tree, module_or_tree) takes the tree first; found {type(tree).__name__} first. "
            "Call fvt.check(tree, module)"
        )
    report = compare(tree, module_or_tree, dtypes=dtypes)
    missing, unexpected = report.missing, report.unexpected
    err: FvTransformError
    if strict and (missing or unexpected):
        err = KeyMismatchError(
            "tree does not match:\n" + str(report) + "\nFix: rename keys (fvt.rename / KeyMap), load the matching "
            "checkpoint, or pass strict=False to list missing and unexpected keys in the report instead."
        )
    elif report.shape_mismatches or report.dtype_mismatches:
        err = ShapeMismatchError(
            "tree does not match:\n" + str(report) + "\nFix: load the matching checkpoint, or reshape or drop the "
            "key (fvt.map_tensors / fvt.drop)."
        )
    else:
        return report
    err.report = report  # type: ignore[union-attr]
    raise err


def compare(
    tree: Mapping[str, torch.Tensor], module_or_tree: nn.Module | Mapping[str, torch.Tensor], *, dtypes: bool = False
) -> CheckReport:
    """The :class:`CheckReport` of :func:`check`, never raising (for callers that raise their own error)."""
    if isinstance(module_or_tree, nn.Module):
        reference: Mapping[str, torch.Tensor] = ParamTree.from_module(module_or_tree)
    else:
        reference = module_or_tree
    missing = tuple(sorted(k for k in reference if k not in tree))
    unexpected = tuple(sorted(k for k in tree if k not in reference))
    shapes = []
    dts = []
    for k in sorted(set(tree) & set(reference)):
        a, b = reference[k], tree[k]
        if tuple(a.shape) != tuple(b.shape):
            shapes.append((k, tuple(a.shape), tuple(b.shape)))
        if dtypes and a.dtype != b.dtype:
            dts.append((k, a.dtype, b.dtype))
    return CheckReport(missing, unexpected, tuple(shapes), tuple(dts))
