"""Key naming as one value: a :class:`KeyMap` of rename, fuse and split rules.

A rule maps *templates*: ``{name}`` stands for one dotted segment, ``{name*}``
for one or more; the rest is literal. Rules are ordered and the first rule that
matches a key claims it. :meth:`KeyMap.plan` turns a map into a
:class:`MappingPlan` for concrete keys and shapes, before any tensor is touched;
the plan records the size of every fused piece, so its inverse splits exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import functools
import re
from typing import Union

import attrs
import torch

from fvtransform._args import check_strict
from fvtransform._messages import format_keys
from fvtransform.errors import KeyMismatchError, PlanError, ShapeMismatchError, UsageError
from fvtransform.tree._paramtree import ParamTree

__all__ = ["Fuse", "KeyMap", "KeyMapLike", "MappingPlan", "Rename", "Split", "Step"]

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")


@functools.lru_cache(maxsize=4096)
def _compile(template: str, stars: frozenset[str] = frozenset()) -> tuple[re.Pattern[str], tuple[str, ...]]:
    pos = 0
    out = []
    names: list[str] = []
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        name, star = m.group(1), m.group(2)
        if name in names:
            raise PlanError(f"template {template!r} uses the field {{{name}}} twice; name each field once")
        names.append(name)
        out.append(f"(?P<{name}>.+?)" if (star or name in stars) else f"(?P<{name}>[^.]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out)), tuple(names)


@functools.lru_cache(maxsize=4096)
def _stars(*templates: str) -> frozenset[str]:
    """Fields that span several segments in any template (so every side matches them so)."""
    return frozenset(m.group(1) for t in templates for m in _FIELD.finditer(t) if m.group(2))


def _match(template: str, key: str, stars: frozenset[str]) -> dict[str, str] | None:
    m = _compile(template, stars)[0].fullmatch(key)
    return None if m is None else m.groupdict()


def _fill(template: str, fields: Mapping[str, str]) -> str:
    return _FIELD.sub(lambda f: fields[f.group(1)], template)


def _same_fields(what: str, templates: Sequence[str]) -> None:
    fields = [set(_compile(t)[1]) for t in templates]
    if any(f != fields[0] for f in fields):
        raise PlanError(
            f"{what}: the templates {list(templates)} use different fields "
            f"({[sorted(f) for f in fields]}); every side must use the same fields so the rule can be inverted"
        )


def _strs(names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise UsageError(
            f"a fuse's sources (a split's targets) are a list of templates; found the string {names!r}. "
            f"Pass a list: Fuse([{names!r}, ...], target) or Split(source, [{names!r}, ...])"
        )
    return tuple(names)


def _sizes(sizes: Iterable[int] | None) -> tuple[int, ...] | None:
    return None if sizes is None else tuple(sizes)


def _opt(optional: bool) -> str:
    return " (optional)" if optional else ""


@attrs.frozen
class Rename:
    """``source`` template -> ``target`` template. A ``(source, target)`` pair is the same rule.

    ``optional=True`` lets a strict plan pass when the rule matches no key
    (for layers only some variants of a model have).

    >>> r = Rename("blocks.{i}.self_attn.q.{p}", "blocks.{i}.attn1.to_q.{p}")
    >>> r, r.inverse()
    (blocks.{i}.self_attn.q.{p} -> blocks.{i}.attn1.to_q.{p}, blocks.{i}.attn1.to_q.{p} -> blocks.{i}.self_attn.q.{p})
    """

    source: str
    target: str
    optional: bool = False

    def __attrs_post_init__(self) -> None:
        _same_fields(f"rename {self.source!r} -> {self.target!r}", (self.source, self.target))

    def inverse(self) -> Rename:
        return Rename(self.target, self.source, self.optional)

    def __repr__(self) -> str:
        return f"{self.source} -> {self.target}{_opt(self.optional)}"


@attrs.frozen
class Fuse:
    """Concatenate ``sources`` (templates with the same fields) into ``target`` along ``dim``.

    ``sizes`` (optional) fixes the size of each piece along ``dim``; without
    it the inverse of the :class:`KeyMap` splits into equal pieces, while the
    inverse of a :class:`MappingPlan` always splits exactly.
    """

    sources: tuple[str, ...] = attrs.field(converter=_strs)
    target: str
    dim: int = 0
    sizes: tuple[int, ...] | None = attrs.field(default=None, converter=_sizes)
    optional: bool = False

    def __attrs_post_init__(self) -> None:
        if len(self.sources) < 2:
            raise PlanError(f"fuse into {self.target!r} needs at least two sources; found {list(self.sources)}")
        if self.sizes is not None and len(self.sizes) != len(self.sources):
            raise PlanError(f"fuse into {self.target!r}: {len(self.sizes)} sizes for {len(self.sources)} sources")
        _same_fields(f"fuse into {self.target!r}", (*self.sources, self.target))

    def inverse(self) -> Split:
        return Split(self.target, self.sources, self.dim, self.sizes, self.optional)

    def __repr__(self) -> str:
        sizes = "" if self.sizes is None else f" sizes={list(self.sizes)}"
        return f"fuse({', '.join(self.sources)}) -> {self.target} dim={self.dim}{sizes}{_opt(self.optional)}"


@attrs.frozen
class Split:
    """Split ``source`` into ``targets`` along ``dim`` (equal pieces unless ``sizes`` is given); a fuse's inverse."""

    source: str
    targets: tuple[str, ...] = attrs.field(converter=_strs)
    dim: int = 0
    sizes: tuple[int, ...] | None = attrs.field(default=None, converter=_sizes)
    optional: bool = False

    def __attrs_post_init__(self) -> None:
        if len(self.targets) < 2:
            raise PlanError(f"split of {self.source!r} needs at least two targets; found {list(self.targets)}")
        if self.sizes is not None and len(self.sizes) != len(self.targets):
            raise PlanError(f"split of {self.source!r}: {len(self.sizes)} sizes for {len(self.targets)} targets")
        _same_fields(f"split of {self.source!r}", (self.source, *self.targets))

    def inverse(self) -> Fuse:
        return Fuse(self.targets, self.source, self.dim, self.sizes, self.optional)

    def __repr__(self) -> str:
        sizes = "" if self.sizes is None else f" sizes={list(self.sizes)}"
        return f"split({self.source}) -> {', '.join(self.targets)} dim={self.dim}{sizes}{_opt(self.optional)}"


Rule = Union[Rename, Fuse, Split]
#: What every ``rename=`` accepts: a KeyMap, a dict of names or templates, or
#: an iterable of ``(source, target)`` pairs, :class:`Rename`, :class:`Fuse`, :class:`Split`.
KeyMapLike = Union["KeyMap", Mapping[str, str], Iterable[Union[Rule, tuple[str, str]]]]

#: The rule ``KeyMap.of(..., keep_rest=True)`` appends: every other key keeps its name.
KEEP_REST = Rename("{key*}", "{key}", optional=True)


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

    def inverse(self) -> Step:
        return Step(self.targets, self.sources, self.dim, self.sizes)

    def out_shapes(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if self.kind == "rename":
            return [shapes[0]]
        if self.kind == "fuse":
            out = list(shapes[0])
            out[self.dim] = sum(self.sizes)
            return [tuple(out)]
        pieces = []
        for n in self.sizes:
            s = list(shapes[0])
            s[self.dim] = n
            pieces.append(tuple(s))
        return pieces


@attrs.frozen
class MappingPlan:
    """A key map resolved for concrete keys and shapes: printable, checked, invertible exactly.

    ``unclaimed`` lists the keys no rule claimed (kept under their names) and
    ``unused_rules`` the required rules that matched no key; both are empty
    unless the plan was made with ``strict=False``.
    """

    steps: tuple[Step, ...]
    unclaimed: tuple[str, ...] = ()
    unused_rules: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = []
        for s in self.steps:
            if s.kind == "rename":
                if s.sources[0] != s.targets[0]:
                    lines.append(f"{s.sources[0]} -> {s.targets[0]}")
            else:
                lines.append(f"{s.kind}({', '.join(s.sources)}) -> {', '.join(s.targets)} dim={s.dim} sizes={list(s.sizes)}")
        if self.unclaimed:
            lines.append(f"unclaimed (kept): {format_keys(self.unclaimed)}")
        if self.unused_rules:
            lines.append(f"unused rules: {', '.join(self.unused_rules)}")
        return "\n".join(lines) or "(no key changes)"

    def inverse(self) -> MappingPlan:
        """The plan that undoes this one, splitting fused keys at the recorded sizes."""
        return MappingPlan(tuple(s.inverse() for s in self.steps), self.unclaimed)

    def target_keys(self) -> list[str]:
        return [t for s in self.steps for t in s.targets]

    def apply(self, tree: Mapping[str, torch.Tensor]) -> ParamTree:
        """Run the plan on a tree; returns a new tree (renamed tensors shared by identity)."""
        out: dict[str, torch.Tensor] = {}
        for s in self.steps:
            missing = [k for k in s.sources if k not in tree]
            if missing:
                raise KeyMismatchError(
                    f"the plan reads {format_keys(missing)}, which the tree lacks; "
                    "make the plan from this tree (key_map.plan(tree)) before applying it"
                )
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


@attrs.frozen(repr=False)
class KeyMap:
    """Rename, fuse and split rules as one value: the one way to name keys.

    Build it with :meth:`KeyMap.of` from a dict of names or templates,
    ``(source, target)`` pairs, :class:`Rename`, :class:`Fuse` and
    :class:`Split` rules; every ``rename=`` of the library accepts the same
    values. Rules are ordered; the first that matches a key claims it.

    *Keeping the rest.* ``KeyMap.of`` appends an optional rule that keeps
    every key the other rules do not name (``keep_rest=True``, the default:
    that is what renaming means). A converter that must account for every key
    (the shipped Wan maps) is built with ``keep_rest=False``.

    *Strict* (the default of :meth:`plan`, of calling the map, of
    ``fvt.rename``): every key must be claimed by a rule *and* every rule not
    marked ``optional=True`` must match a key; leftovers raise, naming them.
    Rules for layers only some variants of a model have (Wan I2V's image
    attention) are marked ``optional=True``, so one map serves every variant
    strictly. ``strict=False`` keeps unclaimed keys under their names and
    lists them, and the unused rules, in the plan (``plan.unclaimed``,
    ``plan.unused_rules``). An incomplete fuse group is always an error.

    ``.then(other)`` composes (a KeyMap of stages); ``.inverse()`` inverts
    every rule (a plan's inverse also knows every fused piece's size).

    >>> m = KeyMap.of([Fuse(["a.q.{p}", "a.k.{p}"], "a.qk.{p}"), ("b.{p}", "c.{p}")])
    >>> m
    KeyMap([fuse(a.q.{p}, a.k.{p}) -> a.qk.{p} dim=0, b.{p} -> c.{p}, {key*} -> {key} (optional)])
    >>> tree = ParamTree({"a.q.w": torch.zeros(2, 3), "a.k.w": torch.ones(1, 3), "b.w": torch.zeros(1), "d": torch.ones(1)})
    >>> plan = m.plan(tree)
    >>> print(plan)
    fuse(a.q.w, a.k.w) -> a.qk.w dim=0 sizes=[2, 1]
    b.w -> c.w
    >>> plan.inverse().apply(plan.apply(tree)) == tree
    True
    """

    stages: tuple[tuple[Rule, ...], ...]

    def __attrs_post_init__(self) -> None:
        ok = isinstance(self.stages, tuple) and all(
            isinstance(stage, tuple) and all(isinstance(r, (Rename, Fuse, Split)) for r in stage) for stage in self.stages
        )
        if not ok:
            raise UsageError(
                f"KeyMap(stages) takes stages of rules; found {type(self.stages).__name__} {self.stages!r:.80}. "
                "Build a key map from names, pairs or rules with KeyMap.of(rules), e.g. KeyMap.of({'a': 'b'})"
            )

    @classmethod
    def of(cls, rules: KeyMapLike, *, keep_rest: bool = True) -> KeyMap:
        """The KeyMap for ``rules``; a KeyMap is returned as it is.

        ``keep_rest=True`` appends an optional rule that keeps every key the
        other rules do not name; ``keep_rest=False`` makes a map that must
        claim every key itself.

        >>> KeyMap.of({"a": "b"})
        KeyMap([a -> b, {key*} -> {key} (optional)])
        >>> KeyMap.of([("blocks.{i}.q.{p}", "layers.{i}.to_q.{p}")], keep_rest=False)
        KeyMap([blocks.{i}.q.{p} -> layers.{i}.to_q.{p}])
        """
        if isinstance(rules, KeyMap):
            return rules
        if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
            raise UsageError(
                f"a key map is a KeyMap, a dict of names, or a list of (source, target) pairs, Rename, Fuse "
                f"and Split rules; found {type(rules).__name__} {rules!r}"
            )
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        out: list[Rule] = []
        for r in items:
            if isinstance(r, (Rename, Fuse, Split)):
                out.append(r)
            elif isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2 and all(isinstance(s, str) for s in r):
                out.append(Rename(r[0], r[1]))
            else:
                raise UsageError(
                    f"a key map rule is a (source, target) pair of strings, Rename, Fuse or Split; found {r!r}"
                )
        if keep_rest:
            out.append(KEEP_REST)
        return cls((tuple(out),))

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules of every stage, in order."""
        return tuple(r for stage in self.stages for r in stage)

    def then(self, other: KeyMapLike) -> KeyMap:
        """``self``, then ``other`` on its result, as one KeyMap."""
        return KeyMap((*self.stages, *KeyMap.of(other).stages))

    def inverse(self) -> KeyMap:
        """The inverse map: every rule inverted, stages in reverse order."""
        return KeyMap(tuple(tuple(r.inverse() for r in stage) for stage in reversed(self.stages)))

    def __call__(self, tree: Mapping[str, torch.Tensor], *, strict: bool = True) -> ParamTree:
        """``self.plan(tree, strict=strict).apply(tree)``; stages that compose into no one plan run one by one."""
        try:
            plan = self.plan(tree, strict=strict)
        except PlanError:
            if len(self.stages) < 2:
                raise
            out = ParamTree._wrap(dict(tree))
            for stage in self.stages:  # e.g. split a tensor, then fuse its pieces in another order
                out = KeyMap((stage,)).plan(out, strict=strict).apply(out)
            return out
        return plan.apply(tree)

    def __repr__(self) -> str:
        return " then ".join(f"KeyMap([{', '.join(repr(r) for r in stage)}])" for stage in self.stages)

    def __str__(self) -> str:
        return "\nthen\n".join("\n".join(repr(r) for r in stage) for stage in self.stages)

    def plan(self, shapes: Mapping[str, torch.Tensor | Sequence[int]], *, strict: bool = True) -> MappingPlan:
        """Plan the mapping of concrete keys (``shapes``: a tree, or key -> shape)."""
        strict = check_strict(strict, "KeyMap.plan")
        shape_of = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
        plan: MappingPlan | None = None
        for stage in self.stages:
            step = _plan_stage(stage, shape_of, strict)
            plan = step if plan is None else _compose(plan, step)
            new_shapes: dict[str, tuple[int, ...]] = {}
            for s in step.steps:
                new_shapes.update(zip(s.targets, s.out_shapes([shape_of[k] for k in s.sources])))
            shape_of = new_shapes
        assert plan is not None  # a KeyMap has at least one stage
        return plan


def _plan_stage(rules: tuple[Rule, ...], shape_of: Mapping[str, tuple[int, ...]], strict: bool) -> MappingPlan:
    used = [False] * len(rules)
    groups: dict[tuple[int, str], dict[int, str]] = {}
    unclaimed: list[str] = []
    order: list[Step | tuple[int, str]] = []
    for key in shape_of:
        claimed: int | None = None
        for ri, rule in enumerate(rules):
            if isinstance(rule, Rename):
                fields = _match(rule.source, key, _stars(rule.source, rule.target))
                if fields is not None:
                    order.append(Step((key,), (_fill(rule.target, fields),)))
                    claimed = ri
                    break
            elif isinstance(rule, Fuse):
                hit = next(
                    ((si, f) for si, src in enumerate(rule.sources) if (f := _match(src, key, _stars(*rule.sources, rule.target))) is not None),
                    None,
                )
                if hit is not None:
                    target = _fill(rule.target, hit[1])
                    group = groups.setdefault((ri, target), {})
                    if not group:
                        order.append((ri, target))
                    group[hit[0]] = key
                    claimed = ri
                    break
            else:
                fields = _match(rule.source, key, _stars(rule.source, *rule.targets))
                if fields is not None:
                    order.append(_split_step(key, tuple(_fill(t, fields) for t in rule.targets), rule, shape_of[key]))
                    claimed = ri
                    break
        if claimed is None:
            unclaimed.append(key)
            order.append(Step((key,), (key,)))
        else:
            used[claimed] = True
    unused = [repr(r) for r, u in zip(rules, used) if not u and not r.optional]
    if strict and (unclaimed or unused):
        parts = []
        if unclaimed:
            parts.append(f"no rule claims {len(unclaimed)} keys: {format_keys(unclaimed)}")
        if unused:
            shown = ", ".join(unused[:6]) + (f", ... ({len(unused) - 6} more)" if len(unused) > 6 else "")
            parts.append(f"rules matched no key: {shown} (the keys look like {format_keys(list(shape_of), limit=4)})")
        raise KeyMismatchError(
            "; ".join(parts) + ". Add a rule for each key (KeyMap.of(..., keep_rest=True) keeps the rest), "
            "fix each unused rule or mark it optional=True, or pass strict=False to keep leftovers "
            "and list them in plan.unclaimed / plan.unused_rules."
        )
    steps: list[Step] = []
    for item in order:
        if isinstance(item, Step):
            steps.append(item)
            continue
        ri, target = item
        rule = rules[ri]
        assert isinstance(rule, Fuse)  # groups are only made for Fuse rules
        got = groups[(ri, target)]
        if len(got) != len(rule.sources):
            raise KeyMismatchError(
                f"incomplete fuse group for {target!r}: found {[got[i] for i in sorted(got)]}, but the rule needs "
                f"{len(rule.sources)} sources ({list(rule.sources)}). Supply all pieces or drop this rule."
            )
        srcs = tuple(got[i] for i in range(len(rule.sources)))
        sizes = tuple(_dim_size(shape_of[k], rule.dim, k) for k in srcs)
        if rule.sizes is not None and sizes != rule.sizes:
            raise ShapeMismatchError(f"fuse into {target!r}: pieces have sizes {list(sizes)}, the rule says {list(rule.sizes)}")
        _check_fusable(srcs, [shape_of[k] for k in srcs], rule.dim)
        steps.append(Step(srcs, (target,), rule.dim, sizes))
    plan = MappingPlan(tuple(steps), tuple(unclaimed), tuple(unused))
    _check_unique(plan)
    return plan


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


def _compose(first: MappingPlan, second: MappingPlan) -> MappingPlan:
    """One plan doing ``first`` then ``second``; renames fold into the fuses and splits around them."""
    made_by: dict[str, tuple[int, int]] = {}  # first's target -> (step index, position)
    for i, s in enumerate(first.steps):
        for j, t in enumerate(s.targets):
            made_by[t] = (i, j)
    split_names: dict[int, list[str]] = {}  # a first-stage split -> its final target names
    out: list[Step | int] = []
    for s in second.steps:
        origins = [made_by[k] for k in s.sources]
        kinds = [first.steps[i].kind for i, _ in origins]
        if s.kind == "rename" and kinds[0] == "split":
            i, j = origins[0]
            if i not in split_names:
                split_names[i] = list(first.steps[i].targets)
                out.append(i)
            split_names[i][j] = s.targets[0]
        elif s.kind == "rename":
            f = first.steps[origins[0][0]]
            out.append(Step(f.sources, s.targets, f.dim, f.sizes))
        elif all(k == "rename" for k in kinds):
            out.append(Step(tuple(first.steps[i].sources[0] for i, _ in origins), s.targets, s.dim, s.sizes))
        else:
            raise PlanError(
                f"cannot compose a {s.kind} of {list(s.sources)} with the {'/'.join(sorted(set(kinds)))} that made "
                "them into one plan; apply the two KeyMaps one after the other"
            )
    steps = [Step(first.steps[o].sources, tuple(split_names[o]), first.steps[o].dim, first.steps[o].sizes)
             if isinstance(o, int) else o for o in out]
    plan = MappingPlan(tuple(steps), first.unclaimed + second.unclaimed, first.unused_rules + second.unused_rules)
    _check_unique(plan)
    return plan


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
    seen: dict[str, tuple[str, ...]] = {}
    for s in plan.steps:
        for t in s.targets:
            if t in seen:
                a, b = (x[0] if len(x) == 1 else list(x) for x in (seen[t], s.sources))
                raise KeyMismatchError(
                    f"the key map maps two keys to {t!r}: {a!r} and {b!r}. "
                    "Make the rules more specific so every key gets its own name."
                )
            seen[t] = s.sources
