"""Key mappings: renames plus fuse rules, planned before any tensor is touched.

A :class:`KeyMap` is a value: ordered rename rules (templates, first match
wins) and fuse rules (several source keys concatenated along a dimension into
one target key). :meth:`KeyMap.plan` turns it into a :class:`MappingPlan` for
concrete keys and shapes; the plan records the split sizes of every fuse, so
``plan.inverse()`` splits exactly, even when the pieces differ in size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import attrs
import torch

from fvtransform.errors import KeyMismatchError, PlanError, ShapeMismatchError, format_keys
from fvtransform.tree._paramtree import ParamTree
from fvtransform.tree._rename import Rename, RenameRules, _compile

__all__ = ["Fuse", "KeyMap", "MappingPlan", "Step"]


@attrs.frozen
class Fuse:
    """Concatenate ``sources`` (templates with the same fields) into ``target`` along ``dim``.

    ``sizes`` (optional) fixes the size of each piece along ``dim``; the
    inverse of a KeyMap needs it, while a :class:`MappingPlan` records it.
    """

    sources: tuple[str, ...] = attrs.field(converter=tuple)
    target: str
    dim: int = 0
    sizes: tuple[int, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))

    def __attrs_post_init__(self) -> None:
        if len(self.sources) < 2:
            raise PlanError(f"fuse into {self.target!r} needs at least two sources; found {list(self.sources)}")
        if self.sizes is not None and len(self.sizes) != len(self.sources):
            raise PlanError(f"fuse into {self.target!r}: {len(self.sizes)} sizes for {len(self.sources)} sources")
        _, fields = _compile(self.target)
        for s in self.sources:
            if set(_compile(s)[1]) != set(fields):
                raise PlanError(f"fuse source {s!r} and target {self.target!r} must use the same fields")


@attrs.frozen
class Split:
    """The inverse of a :class:`Fuse`: split ``source`` into ``targets`` along ``dim``."""

    source: str
    targets: tuple[str, ...] = attrs.field(converter=tuple)
    dim: int = 0
    sizes: tuple[int, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))


@attrs.frozen
class Step:
    """One step of a plan: ``sources`` become ``targets`` (rename: 1 -> 1; fuse: n -> 1; split: 1 -> n)."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    dim: int = 0
    sizes: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        if len(self.sources) > 1:
            return "fuse"
        if len(self.targets) > 1:
            return "split"
        return "rename"


@attrs.frozen
class MappingPlan:
    """Concrete steps for concrete keys: printable, testable, invertible exactly."""

    steps: tuple[Step, ...]

    def __str__(self) -> str:
        lines = []
        for s in self.steps:
            if s.kind == "rename":
                if s.sources[0] != s.targets[0]:
                    lines.append(f"{s.sources[0]} -> {s.targets[0]}")
            else:
                lines.append(f"{s.kind}({', '.join(s.sources)}) -> {', '.join(s.targets)} dim={s.dim} sizes={list(s.sizes)}")
        return "\n".join(lines)

    def inverse(self) -> MappingPlan:
        return MappingPlan(tuple(Step(s.targets, s.sources, s.dim, s.sizes) for s in self.steps))

    def target_keys(self) -> list[str]:
        return [t for s in self.steps for t in s.targets]

    def apply(self, tree: Mapping[str, torch.Tensor]) -> ParamTree:
        """Run the plan on a tree; returns a new tree (renamed tensors shared by identity)."""
        out: dict[str, torch.Tensor] = {}
        for s in self.steps:
            if s.kind == "rename":
                out[s.targets[0]] = tree[s.sources[0]]
            elif s.kind == "fuse":
                out[s.targets[0]] = torch.cat([tree[k] for k in s.sources], dim=s.dim)
            else:
                src = tree[s.sources[0]]
                if src.shape[s.dim] != sum(s.sizes):
                    raise ShapeMismatchError(
                        f"split {s.sources[0]!r}: size {src.shape[s.dim]} along dim {s.dim}, "
                        f"but the plan's pieces sum to {sum(s.sizes)} ({list(s.sizes)})"
                    )
                for key, piece in zip(s.targets, torch.split(src, list(s.sizes), dim=s.dim)):
                    out[key] = piece
        return ParamTree._wrap(out)


RuleLike = Union[Rename, tuple[str, str], Fuse, Split]


@attrs.frozen
class KeyMap:
    """Ordered rename, fuse and split rules; strict by default.

    With ``strict=True`` every key must be claimed by a rule (identity rules
    such as ``("patch_embedding.{p}", "patch_embedding.{p}")`` make that
    explicit); with ``strict=False`` unclaimed keys keep their names. An
    incomplete fuse group is always an error.

    >>> m = KeyMap.of([Fuse(["a.q.{p}", "a.k.{p}"], "a.qk.{p}"), ("b.{p}", "b.{p}")])
    >>> tree = ParamTree({"a.q.w": torch.zeros(2, 3), "a.k.w": torch.ones(1, 3), "b.w": torch.zeros(1)})
    >>> plan = m.plan(tree)
    >>> print(plan)
    fuse(a.q.w, a.k.w) -> a.qk.w dim=0 sizes=[2, 1]
    >>> fused = plan.apply(tree)
    >>> plan.inverse().apply(fused) == tree
    True
    """

    rules: tuple[Rename | Fuse | Split, ...] = attrs.field(converter=tuple)
    strict: bool = True

    @classmethod
    def of(cls, rules: Iterable[RuleLike] | Mapping[str, str], *, strict: bool = True) -> KeyMap:
        if isinstance(rules, KeyMap):
            return rules
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        out: list[Rename | Fuse | Split] = []
        for r in items:
            if isinstance(r, (Rename, Fuse, Split)):
                out.append(r)
            elif isinstance(r, RenameRules):
                out.extend(r.rules)
            elif isinstance(r, Sequence) and len(r) == 2 and all(isinstance(s, str) for s in r):
                out.append(Rename(r[0], r[1]))
            else:
                raise PlanError(f"a KeyMap rule is a (source, target) pair, Rename, Fuse or Split; found {r!r}")
        return cls(tuple(out), strict)

    def then(self, other: KeyMap) -> ComposedKeyMap:
        return ComposedKeyMap((self, other))

    def inverse(self) -> KeyMap:
        """The inverse rules. Fuses without ``sizes`` split into equal pieces."""
        inv: list[Rename | Fuse | Split] = []
        for r in self.rules:
            if isinstance(r, Rename):
                inv.append(r.inverse())
            elif isinstance(r, Fuse):
                inv.append(Split(r.target, r.sources, r.dim, r.sizes))
            else:
                inv.append(Fuse(r.targets, r.source, r.dim, r.sizes))
        return KeyMap(tuple(inv), self.strict)

    def __call__(self, tree: Mapping[str, torch.Tensor]) -> ParamTree:
        return self.plan(tree).apply(tree)

    def plan(self, shapes: Mapping[str, torch.Tensor | Sequence[int]], *, strict: bool | None = None) -> MappingPlan:
        """Plan the mapping of concrete keys (values: tensors or shapes)."""
        strict = self.strict if strict is None else strict
        shape_of = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
        groups: dict[tuple[int, str], dict[int, str]] = {}
        unmatched: list[str] = []
        order: list[tuple[str, object]] = []
        for key in shape_of:
            hit = False
            for ri, rule in enumerate(self.rules):
                if isinstance(rule, Rename):
                    new = rule.apply(key)
                    if new is not None:
                        order.append(("step", Step((key,), (new,))))
                        hit = True
                        break
                elif isinstance(rule, Fuse):
                    for si, src in enumerate(rule.sources):
                        m = _compile(src)[0].fullmatch(key)
                        if m is not None:
                            target = _fill(rule.target, m.groupdict())
                            g = groups.setdefault((ri, target), {})
                            if not g:
                                order.append(("fuse", (ri, target)))
                            g[si] = key
                            hit = True
                            break
                    if hit:
                        break
                else:  # Split
                    m = _compile(rule.source)[0].fullmatch(key)
                    if m is not None:
                        fields = m.groupdict()
                        targets = tuple(_fill(t, fields) for t in rule.targets)
                        order.append(("step", self._split_step(key, targets, rule, shape_of[key])))
                        hit = True
                        break
            if not hit:
                if strict:
                    unmatched.append(key)
                else:
                    order.append(("step", Step((key,), (key,))))
        if unmatched:
            raise KeyMismatchError(
                f"no mapping rule matches {len(unmatched)} keys: {format_keys(unmatched)}. "
                "Add a rule for them (an identity rule keeps a name), or pass strict=False."
            )
        steps: list[Step] = []
        for kind, item in order:
            if kind == "step":
                steps.append(item)  # type: ignore[arg-type]
                continue
            ri, target = item  # type: ignore[misc]
            rule = self.rules[ri]
            if not isinstance(rule, Fuse):  # pragma: no cover - groups are only made for Fuse rules
                raise PlanError(f"internal: fuse group for {target!r} has rule {rule!r}")
            got = groups[(ri, target)]
            if len(got) != len(rule.sources):
                have = [got[i] for i in sorted(got)]
                raise KeyMismatchError(
                    f"incomplete fuse group for {target!r}: found {have}, but the rule needs "
                    f"{len(rule.sources)} sources ({list(rule.sources)}). Supply all pieces or drop this rule."
                )
            srcs = tuple(got[i] for i in range(len(rule.sources)))
            sizes = tuple(_dim_size(shape_of[k], rule.dim, k) for k in srcs)
            if rule.sizes is not None and sizes != rule.sizes:
                raise ShapeMismatchError(f"fuse into {target!r}: pieces have sizes {list(sizes)}, the rule says {list(rule.sizes)}")
            _check_fusable(srcs, [shape_of[k] for k in srcs], rule.dim)
            steps.append(Step(srcs, (target,), rule.dim, sizes))
        plan = MappingPlan(tuple(steps))
        _check_unique(plan)
        return plan

    @staticmethod
    def _split_step(key: str, targets: tuple[str, ...], rule: Split, shape: tuple[int, ...]) -> Step:
        size = _dim_size(shape, rule.dim, key)
        if rule.sizes is not None:
            sizes = tuple(rule.sizes)
        else:
            n = len(targets)
            if size % n:
                raise ShapeMismatchError(
                    f"split {key!r}: size {size} along dim {rule.dim} does not divide into {n} equal pieces; "
                    "give Split/Fuse sizes=, or invert the MappingPlan that fused it"
                )
            sizes = (size // n,) * n
        if sum(sizes) != size:
            raise ShapeMismatchError(f"split {key!r}: size {size} along dim {rule.dim}, sizes {list(sizes)} sum to {sum(sizes)}")
        return Step((key,), targets, rule.dim, sizes)


@attrs.frozen
class ComposedKeyMap:
    """Key maps applied in order."""

    parts: tuple[KeyMap | ComposedKeyMap, ...]

    def __call__(self, tree: Mapping[str, torch.Tensor]) -> ParamTree:
        out = tree if isinstance(tree, ParamTree) else ParamTree(tree)
        for p in self.parts:
            out = p(out)
        return out

    def inverse(self) -> ComposedKeyMap:
        return ComposedKeyMap(tuple(p.inverse() for p in reversed(self.parts)))

    def then(self, other: KeyMap | ComposedKeyMap) -> ComposedKeyMap:
        return ComposedKeyMap((*self.parts, other))


def _fill(template: str, fields: Mapping[str, str]) -> str:
    from fvtransform.tree._rename import _FIELD

    return _FIELD.sub(lambda f: fields[f.group(1)], template)


def _dim_size(shape: tuple[int, ...], dim: int, key: str) -> int:
    if not -len(shape) <= dim < len(shape):
        raise ShapeMismatchError(f"{key!r} has shape {list(shape)}; it has no dim {dim}")
    return shape[dim]


def _check_fusable(keys: Sequence[str], shapes: Sequence[tuple[int, ...]], dim: int) -> None:
    ref = list(shapes[0])
    for k, s in zip(keys, shapes):
        a, b = list(s), list(ref)
        if len(a) != len(b):
            raise ShapeMismatchError(f"cannot fuse {list(keys)}: {k!r} has {len(a)} dims, {keys[0]!r} has {len(b)}")
        a[dim] = b[dim] = 0
        if a != b:
            raise ShapeMismatchError(f"cannot fuse {list(keys)} along dim {dim}: shapes {[list(x) for x in shapes]}")


def _check_unique(plan: MappingPlan) -> None:
    seen: set[str] = set()
    for t in plan.target_keys():
        if t in seen:
            raise KeyMismatchError(f"the mapping produces {t!r} twice; make the rules more specific")
        seen.add(t)
