"""Corpus cases for the registry, config.json / model_index.json and the JSON reader (issue 13).

Configs that try to run code, wrong types, huge integers, deep nesting, huge and ``{}``-bomb files,
``num_layers`` / rope / dimension bombs, and model_index.json tricks. Each gives a specific error naming
the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.io._model import read_json
from fvtransform.registry import BuildLimits

from _corpus import Case


def _weights(path: Path) -> None:
    fvt.save(fvt.ParamTree({"w": torch.zeros(2)}), path)


def _model(root: Path, name: str, config: Any = None, *, raw: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(raw if raw is not None else json.dumps(config), encoding="utf-8",
                                        errors="surrogatepass")
    _weights(folder / "model.safetensors")
    return folder


def _pipeline(root: Path, name: str, index: Any, component: dict | None = None, *, raw: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(raw if raw is not None else json.dumps(index))
    if component is not None:
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text(json.dumps(component))
        _weights(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return folder


def _component(name: str = "transformer") -> Callable[[Path], Any]:
    return lambda p: fvt.load_model(p, component=name)


def _build_with(limits: BuildLimits) -> Callable[[Path], Any]:
    """Build from the folder's config.json under tighter limits (the default limits allow seconds of work)."""
    return lambda p: fvt.build(read_json(p / "config.json"), limits=limits, source=p / "config.json")


def cases(root: Path) -> list[Case]:
    out: list[Case] = []

    def model(name: str, error: type, match: str, config: Any = None, *, raw: str | None = None,
              action: Callable[[Path], Any] = fvt.load_model) -> None:
        out.append(Case(f"registry: {name}", _model(root, name, config, raw=raw), error, match, action))

    # ---- configs that try to run code
    model("cfg_pipeline_trust_remote_code", E.UnsafeFileError,
          r"cfg_pipeline_trust_remote_code/config\.json: key 'trust_remote_code' asks to run code",
          {"architectures": ["pipeline"], "model": "evil/code", "task": "feature-extraction", "trust_remote_code": True})
    model("cfg_pipeline_factory", E.RegistryError,
          r"cfg_pipeline_factory/config\.json: .*key 'architectures\[0\]' names 'pipeline'.*factory",
          {"architectures": ["pipeline"], "model": "evil/code"})
    model("cfg_auto_model_auto_map", E.RegistryError,
          r"cfg_auto_model_auto_map/config\.json: .*'architectures\[0\]' names 'AutoModel'.*Auto class",
          {"architectures": ["AutoModel"], "model_type": "evil", "auto_map": {"AutoModel": "conf.EvilModel"}})
    model("cfg_custom_pipeline", E.UnsafeFileError, r"cfg_custom_pipeline/config\.json: key 'custom_pipeline'",
          {"_class_name": "DiffusionPipeline", "custom_pipeline": "evil/code"})
    model("cfg_module_attr_os_system", E.RegistryError,
          r"cfg_module_attr_os_system/config\.json: key '_class_name' names 'os:system'.*not a class name",
          {"_class_name": "os:system", "command": "touch /tmp/pwned"})
    model("cfg_nested_trust_remote_code", E.UnsafeFileError,
          r"cfg_nested_trust_remote_code/config\.json: key 'text_config\.trust_remote_code'",
          {"architectures": ["CLIPTextModel"], "text_config": {"trust_remote_code": True}})
    model("cfg_not_a_model_class", E.RegistryError,
          r"cfg_not_a_model_class/config\.json: key '_class_name' names 'FlowMatchEulerDiscreteScheduler'.*not a ModelMixin",
          {"_class_name": "FlowMatchEulerDiscreteScheduler"})

    # ---- wrong types
    model("cfg_class_name_int", E.FormatError, r"cfg_class_name_int/config\.json: key '_class_name' must be a string; found an integer",
          {"_class_name": 5})
    model("cfg_architectures_dict", E.FormatError,
          r"cfg_architectures_dict/config\.json: key 'architectures' must be an array or a string; found an object",
          {"architectures": {"BertModel": True}})
    model("cfg_value_wrong_type", E.FormatError,
          r"cfg_value_wrong_type/config\.json: building VideoDiT failed: TypeError",
          {"_class_name": "VideoDiT", "num_layers": "many"})
    model("cfg_top_level_list", E.FormatError, r"cfg_top_level_list/config\.json: the document must be an object; found an array",
          [{"_class_name": "VideoDiT"}])

    # ---- the JSON itself
    model("cfg_huge_int", E.FormatError, r"cfg_huge_int/config\.json: key 'num_layers': an integer of 20001 digits",
          raw='{"_class_name": "VideoDiT", "num_layers": 1' + "0" * 20_000 + "}")
    model("cfg_nan", E.FormatError, r"cfg_nan/config\.json: key 'eps': NaN is not JSON", raw='{"_class_name": "VideoDiT", "eps": NaN}')
    model("cfg_duplicate_key", E.FormatError, r"cfg_duplicate_key/config\.json: key '_class_name' appears twice",
          raw='{"_class_name": "VideoDiT", "_class_name": "pipeline"}')
    model("cfg_deep_nesting", E.FormatError, r"cfg_deep_nesting/config\.json: nesting deeper than 32 levels at x\.x\.x",
          raw='{"_class_name": "VideoDiT", "x": ' + '{"x": ' * 200 + "1" + "}" * 201)
    model("cfg_bracket_bomb", E.FormatError, r"cfg_bracket_bomb/config\.json: nesting deeper than 32 levels",
          raw="[" * 90_000 + "]" * 90_000)
    model("cfg_empty_object_bomb", E.FormatError, r"cfg_empty_object_bomb/config\.json: about \d+ objects and arrays, more than 100000",
          raw='{"_class_name": "VideoDiT", "x": [' + "{}," * 1_000_000 + "{}]}")
    model("cfg_too_big", E.FormatError, r"cfg_too_big/config\.json: the JSON file is \d+ bytes, over the 8388608-byte limit",
          raw='{"_class_name": "VideoDiT", "pad": "' + "x" * (9 << 20) + '"}')
    model("cfg_lone_surrogate", E.FormatError, r"cfg_lone_surrogate/config\.json: a value at _class_name holds a lone surrogate",
          raw='{"_class_name": "Video\\ud800DiT"}')

    # ---- config values that drive unbounded work
    model("cfg_rope_bomb", E.FormatError,
          r"cfg_rope_bomb/config\.json: building VideoDiT: .*max_computed_bytes.*'rope_max_seq_len': 1000000000",
          {"_class_name": "VideoDiT", "rope_max_seq_len": 10**9})
    model("cfg_dim_bomb", E.FormatError,
          r"cfg_dim_bomb/config\.json: building VideoDiT: .*max_tensor_bytes.*'num_attention_heads': 1000000",
          {"_class_name": "VideoDiT", "num_attention_heads": 10**6, "attention_head_dim": 8})
    model("cfg_num_layers_bomb", E.FormatError,
          r"cfg_num_layers_bomb/config\.json: building VideoDiT: .*max_modules.*'num_layers': 100000",
          {"_class_name": "VideoDiT", "num_layers": 100_000}, action=_build_with(BuildLimits(max_modules=200)))

    # ---- model_index.json tricks
    out.append(Case("registry: model_index component whose config asks for a pipeline",
                    _pipeline(root, "idx_component_pipeline", {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]},
                              {"architectures": ["pipeline"], "model": "evil/code"}),
                    E.RegistryError, r"idx_component_pipeline/transformer/config\.json: .*key 'architectures\[0\]' names 'pipeline'",
                    _component()))
    out.append(Case("registry: model_index.json as a list", _pipeline(root, "idx_list", [["diffusers", "WanTransformer3DModel"]]),
                    E.FormatError, r"idx_list/model_index\.json: the document must be an object", _component()))
    out.append(Case("registry: model_index.json component entry of the wrong shape",
                    _pipeline(root, "idx_entry_shape", {"transformer": ["diffusers", 5, "x"]}),
                    E.FormatError, r"idx_entry_shape/model_index\.json: key 'transformer' must be \[library, class\]",
                    _component()))
    out.append(Case("registry: model_index.json with a duplicate component",
                    _pipeline(root, "idx_duplicate", None, raw='{"transformer": ["diffusers", "A"], "transformer": ["diffusers", "B"]}'),
                    E.FormatError, r"idx_duplicate/model_index\.json: key 'transformer' appears twice", _component()))
    out.append(Case("registry: model_index.json {}-bomb",
                    _pipeline(root, "idx_bomb", None, raw='{"transformer": [' + "[]," * 500_000 + "[]]}"),
                    E.FormatError, r"idx_bomb/model_index\.json: about \d+ objects and arrays", _component()))
    return out
