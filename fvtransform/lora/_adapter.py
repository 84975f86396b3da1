"""LoraAdapter: an immutable map from a base tree's keys to weight deltas."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
import math
import types
from typing import Any

import attrs
import torch

from fvtransform.errors import FormatError, NumericError, ShapeMismatchError
from fvtransform.tree import _pytree

__all__ = ["LowRank", "FullDelta", "Replace", "LoraAdapter", "Delta"]


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and t.device.type != "meta" and t.numel() and not bool(torch.isfinite(t).all()):
        raise NumericError(f"{what} holds NaN or Inf; refusing to use it. Re-export the adapter or drop this target.")


@attrs.frozen(repr=False)
class LowRank:
    """``delta = scale * B @ A`` (conv: B ``[out, r, 1...]``, A ``[r, in, k...]``).

    ``magnitude`` is DoRA's per-output-row magnitude vector, when present.
    ``alpha`` is what the file said (for writing it back); ``scale`` is what counts.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def validate(self, where: str) -> None:
        if self.A.dim() < 2 or self.B.dim() < 2:
            raise ShapeMismatchError(f"{where}: LoRA factors need at least 2 dims; A {list(self.A.shape)}, B {list(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"{where}: rank mismatch: A {list(self.A.shape)} has rank {self.A.shape[0]}, "
                f"B {list(self.B.shape)} has rank {self.B.shape[1]}; the file's A and B do not belong together"
            )
        if any(d != 1 for d in self.B.shape[2:]):
            raise ShapeMismatchError(f"{where}: B {list(self.B.shape)} must be 1x1 past its first two dims")
        if not math.isfinite(self.scale):
            raise NumericError(f"{where}: scale {self.scale} is not finite")
        _check_finite(self.A, f"{where} A")
        _check_finite(self.B, f"{where} B")
        if self.magnitude is not None:
            _check_finite(self.magnitude, f"{where} magnitude")

    def fits(self, shape: tuple[int, ...]) -> bool:
        return (
            len(shape) >= 2
            and self.B.shape[0] == shape[0]
            and math.prod(self.A.shape[1:]) == math.prod(shape[1:])
            and (len(self.A.shape) == len(shape) or self.A.dim() == 2)
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.B] + ([self.magnitude] if self.magnitude is not None else [])

    def __repr__(self) -> str:
        return f"LowRank(r={self.rank}, scale={self.scale:g})"


@attrs.frozen(repr=False)
class FullDelta:
    """A full-size delta (``.diff`` for weights, ``.diff_b`` for biases): ``delta = scale * D``."""

    D: torch.Tensor
    scale: float = 1.0

    def validate(self, where: str) -> None:
        _check_finite(self.D, where)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return tuple(self.D.shape) == tuple(shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.D]

    def __repr__(self) -> str:
        return f"FullDelta({list(self.D.shape)}, scale={self.scale:g})"


@attrs.frozen(repr=False)
class Replace:
    """A full replacement tensor (PEFT ``modules_to_save``): merging sets the weight to ``T``."""

    T: torch.Tensor

    @property
    def scale(self) -> float:
        """A replacement is applied whole (PEFT ignores adapter scales for ``modules_to_save``)."""
        return 1.0

    def validate(self, where: str) -> None:
        _check_finite(self.T, where)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return tuple(self.T.shape) == tuple(shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.T]

    def __repr__(self) -> str:
        return f"Replace({list(self.T.shape)})"


Delta = LowRank | FullDelta | Replace


class LoraAdapter(Mapping[str, Delta]):
    """An immutable adapter: base key (e.g. ``blocks.0.attn1.to_q.weight``) -> delta.

    Knows its ranks, alphas, source format and metadata. A registered pytree
    (leaves: the factor tensors), so ``tree_map`` works on it.

    >>> import torch
    >>> a = LoraAdapter({"w": LowRank(torch.zeros(2, 3), torch.zeros(4, 2), scale=0.5)})
    >>> a
    LoraAdapter(1 targets, ranks {2}, format 'memory')
    >>> a.ranks
    {'w': 2}
    """

    __slots__ = ("_targets", "format", "metadata")

    def __init__(self, targets: Mapping[str, Delta], *, format: str = "memory", metadata: Mapping[str, Any] | None = None) -> None:
        data = dict(targets)
        for k, d in data.items():
            if not isinstance(d, (LowRank, FullDelta, Replace)):
                raise FormatError(f"adapter target {k!r}: expected LowRank, FullDelta or Replace, found {type(d).__name__}")
            d.validate(f"adapter target {k!r}")
        object.__setattr__(self, "_targets", types.MappingProxyType(data))
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(metadata or {})))

    def __setattr__(self, name: str, value: Any) -> None:
        from fvtransform.errors import ImmutableError

        raise ImmutableError(f"LoraAdapter is immutable: cannot set {name!r}; build a new adapter")

    def __getitem__(self, key: str) -> Delta:
        return self._targets[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: d.rank for k, d in self._targets.items() if isinstance(d, LowRank)}

    @property
    def scales(self) -> dict[str, float]:
        return {k: d.scale for k, d in self._targets.items()}

    @property
    def alphas(self) -> dict[str, float | None]:
        return {k: d.alpha for k, d in self._targets.items() if isinstance(d, LowRank)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self._targets.values() for t in d.tensors())

    def replace(self, targets: Mapping[str, Delta] | None = None, **kw: Any) -> LoraAdapter:
        return LoraAdapter(
            self._targets if targets is None else targets,
            format=kw.get("format", self.format),
            metadata=kw.get("metadata", self.metadata),
        )

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        full = sum(isinstance(d, FullDelta) for d in self._targets.values())
        extra = f", {full} full deltas" if full else ""
        return f"LoraAdapter({len(self)} targets, ranks {set(ranks) if ranks else '{}'}{extra}, format {self.format!r})"

    def summary(self) -> dict[str, Any]:
        kinds = Counter(type(d).__name__ for d in self._targets.values())
        return {
            "format": self.format,
            "targets": len(self),
            "kinds": dict(kinds),
            "ranks": sorted(set(self.ranks.values())),
            "scales": sorted(set(self.scales.values())),
        }


def _flatten(a: LoraAdapter) -> tuple[list[torch.Tensor], Any]:
    leaves: list[torch.Tensor] = []
    spec = []
    for k, d in a._targets.items():
        if isinstance(d, LowRank):
            leaves += [d.A, d.B] + ([d.magnitude] if d.magnitude is not None else [])
            spec.append((k, "lr", d.scale, d.alpha, d.magnitude is not None))
        elif isinstance(d, Replace):
            leaves.append(d.T)
            spec.append((k, "replace", None, None, False))
        else:
            leaves.append(d.D)
            spec.append((k, "full", d.scale, None, False))
    return leaves, (tuple(spec), a.format, tuple(a.metadata.items()))


def _unflatten(leaves: Any, ctx: Any) -> LoraAdapter:
    spec, fmt, meta = ctx
    it = iter(list(leaves))
    out: dict[str, Delta] = {}
    for k, kind, scale, alpha, has_m in spec:
        if kind == "lr":
            A, B = next(it), next(it)
            out[k] = LowRank(A, B, scale, alpha, next(it) if has_m else None)
        elif kind == "replace":
            out[k] = Replace(next(it))
        else:
            out[k] = FullDelta(next(it), scale)
    adapter = object.__new__(LoraAdapter)
    object.__setattr__(adapter, "_targets", types.MappingProxyType(out))
    object.__setattr__(adapter, "format", fmt)
    object.__setattr__(adapter, "metadata", types.MappingProxyType(dict(meta)))
    return adapter


_pytree.register_node(LoraAdapter, _flatten, _unflatten, name="fvtransform.lora.LoraAdapter")
