"""LyCORIS LoHa and LoKr key sets: reading them into :class:`LoHa` / :class:`LoKr` deltas, and back.

Key layout (per module, after the format's prefix: ``lora_unet_...``,
``diffusion_model....``, ``lycoris_...``): LoHa ``hada_w1_a``, ``hada_w1_b``,
``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2`` for Tucker); LoKr
``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or
``lokr_w2_a``/``lokr_w2_b`` (+ ``lokr_t2`` for Tucker); both with an optional
scalar ``alpha`` and DoRA ``dora_scale``.

Scale rules, as LyCORIS (``lycoris/modules/loha.py``, ``lokr.py``, 4.1.3) and
ComfyUI (``comfy/weight_adapter/loha.py``, ``lokr.py``) apply them:

* LoHa: ``alpha / r`` with ``r = hada_w1_b.shape[0]``; no alpha: 1.
* LoKr: ``alpha / r`` with ``r`` the rank of the factorized side
  (``lokr_w1_b.shape[0]``, else ``lokr_w2_b.shape[0]``); with both sides full
  matrices the scale is 1 whatever the alpha (LyCORIS resets alpha to the
  rank there; ComfyUI ignores it); no alpha: 1.
* alpha 0 is refused: LyCORIS reads it as ``alpha = rank`` (scale 1) and
  ComfyUI as scale 0, so no single merge would be right.
* LoKr with *both* sides factorized and an alpha: LyCORIS 4.1.3
  (``kernels/autograd/lokr.py`` ``rank_scale``, ``LokrModule.make_module_from_state_dict``)
  divides by ``lokr_w1_a.shape[1]``, ComfyUI and Forge by ``lokr_w2_b.shape[0]``
  (the later assignment wins). Equal ranks (all LyCORIS ever writes) agree;
  different ranks are refused as ambiguous, unless the file is fvtransform's own
  (exact ``fvt.scales``).
"""

from __future__ import annotations

from collections.abc import Mapping
import math

import torch

from fvtransform.errors import FormatError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import DORA_EPS, Delta, FullDelta, LoHa, LoKr
from fvtransform.lora._dora import canonical_magnitude, dora_scale_layout

__all__ = ["LYCORIS_ROLES", "is_lycoris", "lycoris_targets", "lycoris_tensors"]

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: (key suffix, role) pairs for ``split_role``; the role is the LyCORIS tensor name.
LYCORIS_ROLES = tuple((f".{n}", n) for n in _LOHA + _LOKR)
#: Roles that may accompany a LyCORIS delta on the same module.
_COMPANIONS = ("alpha", "magnitude", "diff_b")


def is_lycoris(roles: Mapping[str, object]) -> bool:
    """Whether a module's roles hold LyCORIS LoHa/LoKr tensors."""
    return any(r in roles for r in _LOHA + _LOKR)


def _alpha(roles: Mapping[str, tuple[str, torch.Tensor]], label: str) -> float | None:
    if "alpha" not in roles:
        return None
    key, t = roles["alpha"]
    if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise FormatError(f"{label}: {key!r} must be one real number; found {t.dtype} of shape {list(t.shape)}")
    value = float(t.reshape(()).float().item())
    if not math.isfinite(value):
        raise NumericError(f"{label}: {key!r} is {value}; alpha must be finite. Re-export the adapter.")
    if value == 0:
        raise FormatError(
            f"{label}: {key!r} is 0: LyCORIS reads that as alpha = rank (scale 1), ComfyUI as scale 0. "
            "Re-save the file with the alpha you mean (e.g. alpha = rank for scale 1)."
        )
    return value


def lycoris_targets(
    module: str,
    roles: Mapping[str, tuple[str, torch.Tensor]],
    label: str,
    exact: Mapping[str, float] | None = None,
) -> dict[str, Delta]:
    """A module's LyCORIS tensors (roles as ``split_role`` names them) -> ``{module.weight: LoHa | LoKr}``.

    ``roles`` maps a role (``hada_w1_a``, ..., ``alpha``, ``magnitude``,
    ``diff_b``) to ``(file key, tensor)``; ``exact`` are the exact scales an
    fvtransform-written file keeps (``fvt.scales``). A ``diff_b`` becomes the
    bias's full delta.

    Raises:
        FormatError: LoHa and LoKr (or plain LoRA) tensors on one module, missing or stray tensors, alpha 0.
        ShapeMismatchError: factors that do not belong together, a magnitude of the wrong length.
        NumericError: NaN/Inf in a factor or the alpha.
    """
    exact = exact or {}
    first = min(k for k, _ in roles.values())
    where = f"{label}: {first!r}"
    loha = [r for r in _LOHA if r in roles]
    lokr = [r for r in _LOKR if r in roles]
    stray = sorted(roles[r][0] for r in roles if r not in _LOHA + _LOKR + _COMPANIONS)
    if loha and lokr:
        raise FormatError(f"{where}: module {module!r} has both LoHa (hada_*) and LoKr (lokr_*) tensors; keep one")
    if stray:
        raise FormatError(f"{where}: module {module!r} mixes LyCORIS tensors with other LoRA keys {stray}; keep one kind")
    t = {r: roles[r][1] for r in loha + lokr}
    alpha = _alpha(roles, label)
    try:
        if loha:
            missing = [r for r in _LOHA[:4] if r not in t]
            if missing:
                raise FormatError(f"{where}: LoHa module {module!r} lacks {missing}; the file is incomplete")
            delta: LoHa | LoKr = LoHa(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2"))
        else:
            delta = LoKr(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"), t.get("lokr_w2_a"),
                         t.get("lokr_w2_b"), t.get("lokr_t2"))
        delta.validate(where)
    except ShapeMismatchError:
        raise
    except (AttributeError, TypeError, IndexError):  # shapes too broken to describe
        raise ShapeMismatchError(f"{where}: LyCORIS tensors {sorted((r, list(v.shape)) for r, v in t.items())} do not form a delta") from None
    rank = delta.rank
    if isinstance(delta, LoKr) and alpha is not None and module + ".weight" not in exact:
        _check_lokr_ranks(delta, where, roles)
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    scale = float(exact.get(module + ".weight", scale))
    mag = None
    if "magnitude" in roles:
        raw = roles["magnitude"][1]
        cols = delta.columns
        in_guess = int(raw.shape[1]) if raw.dim() >= 2 and raw.shape[0] == 1 and raw.shape[1] and cols % raw.shape[1] == 0 else cols
        mag = canonical_magnitude(raw, delta.out_features, in_guess, f"{label}: {roles['magnitude'][0]!r}")
    fields = {f: getattr(delta, f) for f in (_loha_fields() if loha else _lokr_fields())}
    delta = type(delta)(**fields, scale=scale, alpha=alpha, magnitude=mag, dora_eps=DORA_EPS if mag is not None else 0.0)
    delta.validate(where)
    out: dict[str, Delta] = {module + ".weight": delta}
    if "diff_b" in roles:
        bias = FullDelta(roles["diff_b"][1], float(exact.get(module + ".bias", 1.0)))
        bias.validate(f"{label}: {roles['diff_b'][0]!r}")
        out[module + ".bias"] = bias
    return out


def _check_lokr_ranks(delta: LoKr, where: str, roles: Mapping[str, tuple[str, torch.Tensor]]) -> None:
    """Both LoKr sides factorized with different ranks: LyCORIS and ComfyUI divide alpha by different ranks."""
    if delta.w1_b is None or delta.w2_b is None:
        return
    r1, r2 = int(delta.w1_b.shape[0]), int(delta.w2_b.shape[0])
    if r1 != r2:
        raise FormatError(
            f"{where}: LoKr factors of ranks {r1} (lokr_w1_a/b) and {r2} (lokr_w2_a/b) with {roles['alpha'][0]!r}: LyCORIS "
            f"divides alpha by {r1}, ComfyUI by {r2}, so the intended scale is unknown. Fix: re-save with equal ranks, "
            "or drop the alpha and fold the scale into the factors"
        )


def _loha_fields() -> tuple[str, ...]:
    return ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")


def _lokr_fields() -> tuple[str, ...]:
    return ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")


def lycoris_tensors(delta: LoHa | LoKr) -> dict[str, torch.Tensor]:
    """The key suffixes and tensors a LyCORIS file holds for ``delta`` (for writing it back).

    ``alpha`` is written as ``scale * rank`` (so any reader gets the scale
    back); a LoKr with both sides full gets no alpha (its scale must be 1).
    The magnitude is written as LyCORIS does: ``[out, 1...]`` or ``[1, in, 1...]``
    (:func:`fvtransform.lora._dora.dora_scale_layout`; with the weight's dims
    where the factors tell them, else 2-D).
    """
    names, fields = (_LOHA, _loha_fields()) if isinstance(delta, LoHa) else (_LOKR, _lokr_fields())
    out = {f".{n}": getattr(delta, f).contiguous() for n, f in zip(names, fields) if getattr(delta, f) is not None}
    if delta.rank is not None:
        out[".alpha"] = torch.tensor(delta.scale * delta.rank, dtype=torch.float32)
    elif delta.scale != 1.0:
        raise UsageError(f"a LoKr with both sides full has scale 1 in every reader; its scale {delta.scale} cannot be written")
    if delta.magnitude is not None:
        out[".dora_scale"] = dora_scale_layout(delta.magnitude, _weight_ndim(delta)).contiguous()
    return out


def _weight_ndim(delta: LoHa | LoKr) -> int:
    """The weight's dims where the factors tell them (Tucker cores, a full conv ``lokr_w2``), else 2."""
    core = delta.t1 if isinstance(delta, LoHa) else (delta.t2 if delta.t2 is not None else delta.w2)
    return core.dim() if core is not None else 2
