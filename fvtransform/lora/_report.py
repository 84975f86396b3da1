"""What loading a LoRA accounted for: the format, the key -> target mapping, what was left over and why."""

from __future__ import annotations

from collections.abc import Mapping
import types

import attrs

__all__ = ["ResolutionReport"]


def _frozen_map(m: Mapping[str, object]) -> Mapping[str, object]:
    return types.MappingProxyType(dict(m))


@attrs.frozen
class ResolutionReport:
    """How :func:`fvtransform.lora.load` resolved a file: every key is either a target's or skipped.

    Every loaded adapter carries one as ``adapter.report``. With ``strict=True``
    (the default) ``skipped`` is always empty: a leftover raises instead.
    With ``strict=False`` the leftovers are kept out of the adapter and listed
    here with the reason.

    Attributes:
        format: the format the file was read as.
        scores: each format's share of the file's keys (empty when ``format=`` was given).
        targets: target key -> the file key (the first of its module) it came from.
        skipped: ``(key, reason)`` for each file key (or target) left over.
        convention: where the scales came from and how they are computed.
    """

    format: str = ""
    scores: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map)
    targets: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    skipped: tuple[tuple[str, str], ...] = ()
    convention: str = ""

    @property
    def ok(self) -> bool:
        """Whether every key was claimed (nothing skipped)."""
        return not self.skipped

    def __str__(self) -> str:
        lines = [f"LoRA format {self.format!r}: {len(self.targets)} targets, {len(self.skipped)} skipped"]
        if self.convention:
            lines.append(f"  scale: {self.convention}")
        lines += [f"  {target} <- {key}" for target, key in self.targets.items()]
        lines += [f"  skipped {key}: {why}" for key, why in self.skipped]
        return "\n".join(lines)
