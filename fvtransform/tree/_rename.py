"""Renames as values: ordered template rules with an inverse.

A rule maps a *template* to a template. ``{name}`` stands for one dotted
segment, ``{name*}`` for one or more segments; the rest is literal. The first
rule whose source matches a key wins; keys no rule matches keep their name.
Because templates are symmetric, a rename of template rules has an inverse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import functools
import re
from typing import Union

import attrs

from fvtransform.errors import KeyMismatchError, PlanError, format_keys

__all__ = ["Rename", "RenameRules", "as_rename"]

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


@attrs.frozen
class Rename:
    """One rule: ``source`` template -> ``target`` template.

    >>> r = Rename("blocks.{i}.self_attn.q.{p}", "blocks.{i}.attn1.to_q.{p}")
    >>> r.apply("blocks.7.self_attn.q.weight")
    'blocks.7.attn1.to_q.weight'
    >>> r.inverse().apply("blocks.7.attn1.to_q.weight")
    'blocks.7.self_attn.q.weight'
    """

    source: str
    target: str

    def __attrs_post_init__(self) -> None:
        _, src_names = _compile(self.source)
        _, dst_names = _compile(self.target)
        if set(src_names) != set(dst_names):
            raise PlanError(
                f"rule {self.source!r} -> {self.target!r}: fields differ "
                f"(source {sorted(src_names)}, target {sorted(dst_names)}); "
                "both sides must use the same fields so the rule can be inverted"
            )

    @property
    def stars(self) -> frozenset[str]:
        """Fields that span several segments on either side (so the inverse matches them too)."""
        return frozenset(m.group(1) for t in (self.source, self.target) for m in _FIELD.finditer(t) if m.group(2))

    def apply(self, key: str) -> str | None:
        """The renamed key, or None when the rule does not match."""
        regex, _ = _compile(self.source, self.stars)
        m = regex.fullmatch(key)
        if m is None:
            return None
        groups = m.groupdict()
        return _FIELD.sub(lambda f: groups[f.group(1)], self.target)

    def inverse(self) -> Rename:
        return Rename(self.target, self.source)


RuleLike = Union[Rename, tuple[str, str]]


@attrs.frozen
class RenameRules:
    """An ordered list of :class:`Rename` rules; the first match wins.

    ``strict=True`` (the default when applied to a tree) requires every rule
    to match at least one key, which catches typos in rules.

    >>> rules = RenameRules.of([("a.{x}", "b.{x}"), ("c", "d")])
    >>> rules.plan(["a.1", "c", "e"])
    {'a.1': 'b.1', 'c': 'd', 'e': 'e'}
    >>> rules.inverse().plan(["b.1", "d", "e"])
    {'b.1': 'a.1', 'd': 'c', 'e': 'e'}
    """

    rules: tuple[Rename, ...] = attrs.field(converter=tuple)

    @classmethod
    def of(cls, rules: RenameRules | Mapping[str, str] | Iterable[RuleLike]) -> RenameRules:
        if isinstance(rules, RenameRules):
            return rules
        if isinstance(rules, Mapping):
            items: Iterable[RuleLike] = list(rules.items())
        else:
            items = rules
        out = []
        for r in items:
            if isinstance(r, Rename):
                out.append(r)
            elif isinstance(r, Sequence) and len(r) == 2 and all(isinstance(s, str) for s in r):
                out.append(Rename(r[0], r[1]))
            else:
                raise PlanError(f"a rename rule is Rename(source, target) or a (source, target) pair; found {r!r}")
        return cls(tuple(out))

    def inverse(self) -> RenameRules:
        return RenameRules(tuple(r.inverse() for r in self.rules))

    def then(self, other: RenameRules) -> ComposedRename:
        """``self`` then ``other``, as one rename."""
        return ComposedRename((self, other))

    def plan(self, keys: Iterable[str], *, strict: bool = False) -> dict[str, str]:
        """Map each key to its new name; check collisions (and unused rules if strict)."""
        keys = list(keys)
        used = [False] * len(self.rules)
        out: dict[str, str] = {}
        for key in keys:
            new = key
            for i, rule in enumerate(self.rules):
                applied = rule.apply(key)
                if applied is not None:
                    used[i] = True
                    new = applied
                    break
            out[key] = new
        if strict and not all(used):
            unused = [f"{r.source!r} -> {r.target!r}" for r, u in zip(self.rules, used) if not u]
            raise KeyMismatchError(
                f"rename rules matched no key: {', '.join(unused)}; "
                f"the tree's keys look like {format_keys(keys, limit=4)}. "
                "Fix the rule, or pass strict=False to allow unused rules."
            )
        _check_collisions(out)
        return out


@attrs.frozen
class ComposedRename:
    """Several renames applied in order."""

    parts: tuple[RenameRules | ComposedRename, ...]

    def plan(self, keys: Iterable[str], *, strict: bool = False) -> dict[str, str]:
        current = {k: k for k in keys}
        for part in self.parts:
            step = part.plan(list(current.values()), strict=strict)
            current = {orig: step[now] for orig, now in current.items()}
        _check_collisions(current)
        return current

    def inverse(self) -> ComposedRename:
        return ComposedRename(tuple(p.inverse() for p in reversed(self.parts)))

    def then(self, other: RenameRules | ComposedRename) -> ComposedRename:
        return ComposedRename((*self.parts, other))


def _check_collisions(plan: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for old, new in plan.items():
        if new in seen:
            raise KeyMismatchError(
                f"rename maps two keys to {new!r}: {seen[new]!r} and {old!r}. "
                "Make the rules more specific so every key gets its own name."
            )
        seen[new] = old


def as_rename(rules: object) -> RenameRules | ComposedRename:
    """Accept RenameRules, a composed rename, a dict of exact names, or pairs."""
    if isinstance(rules, (RenameRules, ComposedRename)):
        return rules
    return RenameRules.of(rules)  # type: ignore[arg-type]
