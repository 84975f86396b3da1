"""The LoRA file formats as data: one frozen :class:`LoraFormat` per format.

Reading (:mod:`._detect`, :mod:`._load`, :mod:`._targets`) and writing (:mod:`._write`) loop over this table;
adding a format is one entry here plus its fixtures. Key suffixes (roles) are
one table too (:data:`ROLES`), shared by every format; each format says which
roles it reads and which names it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
import types

import attrs

__all__ = [
    "LoraFormat", "TABLE", "FORMATS", "ROLES", "LYCORIS_SUFFIXES", "BY_NAME", "PARAM_RENAMES",
    "DIFFUSERS_COMPONENTS", "KOHYA_PREFIXES", "PEFT_CONFIG", "PEFT_WEIGHTS", "DIFFUSERS_WEIGHTS", "DIFFUSERS_META",
    "FVT_SCALES", "FVT_DORA_EPS", "SCALE_CONVENTIONS",
]

#: File and header names the formats use.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_META = "lora_adapter_metadata"
#: fvtransform's own exact scales per target, kept in the header of every LoRA file it writes.
FVT_SCALES = "fvt.scales"
#: fvtransform's own DoRA eps per target (a PEFT file cannot hold it: peft reads every DoRA with eps 0).
FVT_DORA_EPS = "fvt.dora_eps"

#: Key suffix -> role, longest first where one suffix ends another.
#: A, B: the LoRA factors; alpha: a scalar alpha tensor; magnitude: DoRA's vector;
#: diff / diff_b: a full delta of the weight / bias; diff_param: ``<m>.diff_m``, a full delta of
#: the parameter ``<m>.modulation`` (Wan; lightx2v's extractor writes it); fv_rank / fv_alpha:
#: FastVideo's per-module rank and alpha tensors; lycoris: LoHa / LoKr factors (see
#: :data:`LYCORIS_SUFFIXES`).
ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".lora_magnitude_vector.default.weight", "magnitude"),
    (".lora_magnitude_vector.default", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "magnitude"),
    (".lora_rank", "fv_rank"),
    (".lora_alpha", "fv_alpha"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_param"),
    (".diff", "diff"),
)

#: LyCORIS LoHa / LoKr tensors. They are dispatched in ONE place
#: (``_targets.build_targets``), which hands them to :mod:`fvtransform.lora._lycoris`.
LYCORIS_SUFFIXES: tuple[str, ...] = (
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_t2",
)

DIFFUSERS_COMPONENTS = ("transformer.", "transformer_2.", "text_encoder.", "text_encoder_2.", "unet.")
#: Kohya prefixes, longest first: VideoX-Fun writes ``lora_unet__`` (two underscores).
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lora_te1_", "lora_te2_", "lora_te_")

#: Parameters (not modules) that original Wan names differently; full deltas target them directly.
PARAM_RENAMES: tuple[tuple[str, str], ...] = (
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("head.modulation", "scale_shift_table"),
)

_LORA_ROLES = frozenset({"A", "B", "alpha", "magnitude"})
_FULL_ROLES = frozenset({"diff", "diff_b", "diff_param"})


def _frozen(roles: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy of a role table."""
    return types.MappingProxyType(dict(roles))


@attrs.frozen
class LoraFormat:
    """One LoRA file format.

    Attributes:
        name: the ``format=`` name.
        tool: who writes and reads it (for messages and docs).
        prefixes: key prefixes that mark the format (empty: no prefix).
        strip: how a prefix is removed: ``"prefix"`` (drop it), ``"component"`` (diffusers:
            the prefix names a pipeline component) or ``"underscored"`` (kohya: the rest has
            dots replaced by underscores, resolved against the base's names).
        reads: the roles this format's files may hold.
        scale: where rank and alpha live: ``"config"`` (adapter_config.json), ``"metadata"``
            (diffusers' ``lora_adapter_metadata`` header, keys prefixed by the component),
            ``"metadata-unprefixed"`` (the same header as a model's ``save_lora_adapter``
            writes it), ``"tensor"`` (a scalar ``.alpha`` per module; none means alpha = r) or
            ``"fastvideo"`` (``.lora_rank`` int and ``.lora_alpha`` float per module).
        needs_meta: the format is only considered when the file's header holds this key.
        needs_role: the format is only considered when some key has this role.
        write_roles: role -> suffix when writing (empty: not written).
        write_prefix: what goes before a module name when writing (``{component}`` is filled in).
        write_names: ``"as-is"``, ``"original"`` (original Wan names) or ``"underscored"``
            (original Wan names with dots replaced by underscores).
        holds: what the format can express when writing: ``lowrank``, ``dora``, ``full``, ``replace``.
    """

    name: str
    tool: str
    prefixes: tuple[str, ...]
    strip: str
    reads: frozenset[str]
    scale: str
    needs_meta: str | None = None
    needs_role: str | None = None
    write_roles: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    write_prefix: str = ""
    write_names: str = "as-is"
    holds: frozenset[str] = frozenset()


_PEFT_WRITE = {"A": ".lora_A.weight", "B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}

TABLE: tuple[LoraFormat, ...] = (
    LoraFormat(
        "peft", "PEFT save_pretrained", ("base_model.model.",), "prefix", _LORA_ROLES | _FULL_ROLES, "config",
        write_roles=_PEFT_WRITE, write_prefix="base_model.model.", holds=frozenset({"lowrank", "dora", "replace"}),
    ),
    LoraFormat(
        "diffusers", "diffusers save_lora_weights (pipeline)", DIFFUSERS_COMPONENTS, "component", _LORA_ROLES | _FULL_ROLES, "metadata",
        write_roles=_PEFT_WRITE, write_prefix="{component}.", holds=frozenset({"lowrank"}),
    ),
    LoraFormat(
        "kohya", "kohya sd-scripts / musubi-tuner / VideoX-Fun", KOHYA_PREFIXES, "underscored", _LORA_ROLES | _FULL_ROLES,
        "tensor",
        write_roles={"A": ".lora_down.weight", "B": ".lora_up.weight", "alpha": ".alpha", "magnitude": ".dora_scale",
                     "diff": ".diff", "diff_b": ".diff_b"},
        write_prefix="lora_unet_", write_names="underscored", holds=frozenset({"lowrank", "dora", "full", "lycoris"}),
    ),
    LoraFormat(
        "comfy", "ComfyUI / original checkpoint names", ("diffusion_model.",), "prefix", _LORA_ROLES | _FULL_ROLES, "tensor",
        write_roles={"A": ".lora_A.weight", "B": ".lora_B.weight", "alpha": ".alpha", "diff": ".diff", "diff_b": ".diff_b",
                     "diff_param": ".diff"},
        write_prefix="diffusion_model.", write_names="original", holds=frozenset({"lowrank", "full", "lycoris"}),
    ),
    LoraFormat(
        "diffusers-model", "diffusers save_lora_adapter (one model)", (), "prefix", _LORA_ROLES | _FULL_ROLES, "metadata-unprefixed",
        needs_meta="lora_adapter_metadata",
        write_roles=_PEFT_WRITE, holds=frozenset({"lowrank"}),
    ),
    LoraFormat("plain", "unprefixed PEFT-style keys", (), "prefix", _LORA_ROLES | _FULL_ROLES, "config"),
    LoraFormat(
        "fastvideo", "FastVideo lora_extraction / LoRA layers", (), "prefix", frozenset({"A", "B", "fv_rank", "fv_alpha"}),
        "fastvideo", needs_role="fv_rank",
    ),
)

#: How each ``scale`` source gives a low-rank target's scale (for reports and docs); ``"none"``: a config
#: format whose file came without its config. A module's ``.alpha`` tensor, where present, gives its alpha.
SCALE_CONVENTIONS: Mapping[str, str] = types.MappingProxyType({
    "config": "scale = lora_alpha / r from adapter_config.json (rank_pattern / alpha_pattern per module; "
              "alpha / sqrt(r) with use_rslora)",
    "metadata": "scale = lora_alpha / r from the config (adapter_config.json, else the header "
                "'lora_adapter_metadata', component-prefixed)",
    "metadata-unprefixed": "scale = lora_alpha / r from the header 'lora_adapter_metadata'",
    "tensor": "scale = alpha / rank from each module's .alpha tensor; none: alpha = rank (scale 1)",
    "fastvideo": "scale = lora_alpha / lora_rank from each module's tensors; none: scale 1",
    "none": "no config: scale = alpha / rank from a module's .alpha tensor, else 1 (alpha = rank)",
})

BY_NAME: Mapping[str, LoraFormat] = types.MappingProxyType({f.name: f for f in TABLE})
FORMATS: tuple[str, ...] = tuple(f.name for f in TABLE)
"""The names of the LoRA file formats ``fvt.lora.load`` reads and ``fvt.lora.save`` writes (``format=``)."""
#: every prefix some format claims: unprefixed formats do not read keys that start with one
CLAIMED_PREFIXES: tuple[str, ...] = tuple(p for f in TABLE for p in f.prefixes)
