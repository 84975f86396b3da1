"""Issue 13 (registry / config / JSON): no config runs code, builds are bounded, every JSON read is safe."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform._json import JsonLimits, check_type, get_field, loads_json, read_json_file
from fvtransform.errors import FormatError, FvTransformError, NotFoundError, RegistryError, UnsafeFileError
from fvtransform.io._model import read_json
from fvtransform.registry import BuildLimits, meta_parameters
from fvtransform.registry._budget import DEFAULT_BUILD_LIMITS

# ----------------------------------------------------------------------------- payloads
_PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("code from a config ran: " + __name__)
"""

_REMOTE_CONF = _PAYLOAD + """
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evilmodel"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def _payloads(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A local "remote code" repo (config.json + conf.py) and a module on sys.path; both write ``marker`` when run."""
    marker = root / "MARKER"
    evil = root / "evil"
    evil.mkdir(parents=True)
    (evil / "conf.py").write_text(_REMOTE_CONF.format(marker=str(marker)))
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evilmodel", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "conf.EvilConfig", "AutoModel": "conf.EvilModel"},
    }))
    pkg = root / "site"
    pkg.mkdir()
    (pkg / "fvt_evil_payload.py").write_text(_PAYLOAD.format(marker=str(marker)) + "\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, "fvt_evil_payload", raising=False)
    # should the old code ever run: remote modules land in tmp, never in the user's cache
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(root / "hf-modules"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return marker, evil


def _attack_configs(evil: Path) -> dict[str, dict]:
    auto_map = {"AutoConfig": "conf.EvilConfig", "AutoModel": "conf.EvilModel"}
    return {
        "architectures=pipeline, trust_remote_code": {
            "architectures": ["pipeline"], "task": "feature-extraction", "model": str(evil), "trust_remote_code": True},
        "architectures=pipeline": {"architectures": ["pipeline"], "task": "feature-extraction", "model": str(evil)},
        "transformers AutoModel with auto_map": {
            "architectures": ["AutoModel"], "model_type": "evilmodel", "auto_map": auto_map, "name_or_path": str(evil)},
        "remote-only architecture": {"architectures": ["EvilModel"], "model_type": "evilmodel", "auto_map": auto_map},
        "diffusers AutoModel": {"_class_name": "AutoModel", "_diffusers_version": "0.42.0", "auto_map": auto_map,
                                "pretrained_model_name_or_path": str(evil), "trust_remote_code": False},
        "diffusers pipeline with custom_pipeline": {"_class_name": "DiffusionPipeline", "custom_pipeline": str(evil)},
        "_class_name as a custom-pipeline list": {"_class_name": ["fvt_evil_payload", "Model"]},
        "_class_name as 'module:Attr'": {"_class_name": "fvt_evil_payload:Model"},
        "_class_name naming os.system": {"_class_name": "os:system", "command": "true"},
        "architectures naming os.system": {"architectures": ["os.system", "builtins:exec"]},
        "_class_name dunder": {"_class_name": "__import__", "name": "fvt_evil_payload"},
        "_diffusers_version trick": {"_class_name": "WanTransformer3DModel", "_diffusers_version": "99.0.0",
                                     "trust_remote_code": True, "custom_pipeline": str(evil)},
        "nested trust_remote_code": {"architectures": ["CLIPTextModel"],
                                     "text_config": {"trust_remote_code": True, "auto_map": auto_map}},
        "base classes": {"architectures": ["PreTrainedModel"], "_class_name": "ModelMixin"},
    }


def _model_folder(root: Path, name: str, config: dict) -> Path:
    folder = root / "models" / name.replace(" ", "_").replace("'", "").replace(":", "_").replace(",", "")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    fvt.save(fvt.ParamTree({"w": torch.zeros(2)}), folder / "model.safetensors")
    return folder


def test_no_config_runs_code_through_any_entry_point(tmp_path, monkeypatch, capsys):
    """Every route a config has to a class (resolve, build, load_model, the CLI): refused, typed, nothing runs."""
    from fvtransform.cli import main

    marker, evil = _payloads(tmp_path, monkeypatch)
    lora = tmp_path / "lora.safetensors"
    fvt.save(fvt.ParamTree({"w.lora_A.weight": torch.zeros(1, 2), "w.lora_B.weight": torch.zeros(2, 1)}), lora)
    problems = []
    for name, config in _attack_configs(evil).items():
        folder = _model_folder(tmp_path, name, config)
        for route, call in {
            "resolve": lambda c=config: fvt.resolve(dict(c)),
            "build": lambda c=config: fvt.build(dict(c)),
            "load_model": lambda f=folder: fvt.load_model(f),
            "CLI demo --model": lambda f=folder: main(["demo", "--model", str(f), "--lora", str(lora)]) == 2 or 1 / 0,
            "CLI inspect": lambda f=folder: main(["inspect", str(f)]),  # reads headers only: must not build either
        }.items():
            try:
                call()
                if not route.startswith("CLI"):
                    problems.append(f"{name} via {route}: no error")
            except FvTransformError:
                pass
            except Exception as e:
                problems.append(f"{name} via {route}: {type(e).__name__}: {str(e)[:120]}")
            if marker.exists():
                problems.append(f"{name} via {route}: RAN CODE ({marker.read_text()})")
                marker.unlink()
    assert "fvt_evil_payload" not in sys.modules
    assert not problems, "\n".join(problems)
    assert "Traceback" not in capsys.readouterr().err


def test_hub_model_whose_config_asks_for_a_pipeline_runs_nothing(fake_hub, tmp_path, monkeypatch):
    """The issue's case: ``fvt.load_model("org/model")`` with ``architectures: ["pipeline"]``."""
    import io

    marker, evil = _payloads(tmp_path, monkeypatch)
    buf = io.BytesIO()
    weights = tmp_path / "w.safetensors"
    fvt.save(fvt.ParamTree({"w": torch.zeros(2)}), weights)
    buf.write(weights.read_bytes())
    config = {"architectures": ["pipeline"], "model": str(evil), "task": "feature-extraction", "trust_remote_code": True}
    fake_hub.add_commit("org/model", {"config.json": json.dumps(config).encode(), "model.safetensors": buf.getvalue()})
    with pytest.raises(UnsafeFileError, match=r"config\.json: key 'trust_remote_code' asks to run code"):
        fvt.load_model("org/model")
    del config["trust_remote_code"]
    fake_hub.add_commit("org/model2", {"config.json": json.dumps(config).encode(), "model.safetensors": buf.getvalue()})
    with pytest.raises(RegistryError, match=r"config\.json: .*'pipeline'.*a pipeline or a factory"):
        fvt.load_model("org/model2")
    assert not marker.exists()


@pytest.mark.parametrize(("config", "error", "match"), [
    ({"architectures": ["AutoModelForCausalLM"]}, RegistryError, r"architectures\[0\]'.*'AutoModelForCausalLM'.*Auto class"),
    ({"architectures": ["PreTrainedModel"]}, RegistryError, r"factory"),
    ({"architectures": ["PretrainedConfig"]}, RegistryError, r"not a PreTrainedModel subclass"),
    ({"architectures": ["is_torch_available"]}, RegistryError, r"not a PreTrainedModel subclass \(found \w+\)"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, RegistryError, r"not a ModelMixin subclass"),
    ({"_class_name": "WanPipeline"}, RegistryError, r"pipeline"),
    ({"_class_name": "AutoencoderKLWan "}, RegistryError, r"not a class name"),
    ({"_class_name": 5}, FormatError, r"key '_class_name' must be a string; found an integer \(5\)"),
    ({"_class_name": None}, FormatError, r"key '_class_name' must be a string; found null"),
    ({"architectures": {"BertModel": 1}}, FormatError, r"key 'architectures' must be an array or a string; found an object"),
    ({"architectures": ["BertModel", 7]}, FormatError, r"key 'architectures\[1\]' must be a string"),
    ({"_class_name": "WanTransformer3DModel", "custom_pipeline": "x/y"}, UnsafeFileError, r"key 'custom_pipeline'"),
])
def test_a_config_resolves_only_to_checked_model_classes(config, error, match):
    with pytest.raises(error, match=match):
        fvt.resolve(config, source="cfg.json")
    with pytest.raises(error, match=r"cfg\.json"):
        fvt.build(config, source="cfg.json")


def test_library_model_classes_still_resolve_and_build_with_their_own_keys_only():
    from diffusers import AutoencoderKLWan
    from transformers import BertModel, CLIPTextModel

    assert fvt.resolve({"_class_name": "AutoencoderKLWan"}) is AutoencoderKLWan
    assert fvt.resolve({"architectures": ["NoSuchArch", "BertModel"]}) is BertModel
    # keys that select code at run time are removed at every level; a stray key never reaches __init__
    m = fvt.build({"architectures": ["CLIPTextModel"], "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                   "num_attention_heads": 4, "vocab_size": 99, "max_position_embeddings": 7,
                   "attn_implementation": "kernels-community/evil", "auto_map": {"AutoModel": "conf.EvilModel"}})
    assert isinstance(m, CLIPTextModel) and not hasattr(m.config, "auto_map")
    assert m.config._attn_implementation in {"sdpa", "eager"}
    assert dict(m.named_buffers())["embeddings.position_ids"].device.type == "cpu"  # non-persistent: computed for real
    w = fvt.build({"_class_name": "WanTransformer3DModel", "num_layers": 1, "num_attention_heads": 2,
                   "attention_head_dim": 8, "ffn_dim": 16, "text_dim": 8, "freq_dim": 8, "in_channels": 4,
                   "out_channels": 4, "rope_max_seq_len": 16, "no_such_key": 1, "auto_map": {"x": "y"}})
    assert "no_such_key" not in w.config and len(w.blocks) == 1


def test_registered_constructors_get_only_the_keys_they_take():
    reg = fvt.Registry()
    fvt.register("lin", torch.nn.Linear, registry=reg)
    with pytest.raises(FormatError, match=r"key 'evil' is not a parameter of 'Linear'"):
        fvt.build("lin", {"in_features": 2, "out_features": 2, "evil": 1}, registry=reg)
    with pytest.raises(UnsafeFileError, match=r"key 'trust_remote_code'"):
        fvt.build("lin", {"in_features": 2, "out_features": 2, "trust_remote_code": True}, registry=reg)
    with pytest.raises(FormatError, match=r"cfg\.json: building Linear failed: TypeError"):
        fvt.build("lin", {"in_features": "two", "out_features": 2}, registry=reg, source="cfg.json")
    assert fvt.build("lin", {"in_features": 2, "out_features": 3, "_private": 1}, registry=reg).weight.shape == (3, 2)


# ----------------------------------------------------------------------------- bounded builds
REAL_CONFIGS = {
    "Wan2.1-T2V-14B": ({"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": None,
                        "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
                        "image_dim": None, "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
                        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                        "text_dim": 4096}, 14_288_491_584),
    "HunyuanVideo": ({"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.32.0.dev0",
                      "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 16, "mlp_ratio": 4.0,
                      "num_attention_heads": 24, "num_layers": 20, "num_refiner_layers": 2, "num_single_layers": 40,
                      "out_channels": 16, "patch_size": 2, "patch_size_t": 1, "pooled_projection_dim": 768,
                      "qk_norm": "rms_norm", "rope_axes_dim": [16, 56, 56], "rope_theta": 256.0, "text_embed_dim": 4096},
                     12_821_012_544),
    "UMT5-XXL encoder (Wan)": ({"architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
                                "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": True,
                                "model_type": "umt5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
                                "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                                "torch_dtype": "bfloat16", "vocab_size": 256384, "tie_word_embeddings": False},
                               5_680_910_336),
}


def test_real_video_models_build_on_meta_within_the_default_limits():
    """Configs of Wan 14B, HunyuanVideo and UMT5-XXL (its 4 GB embedding starts as torch.empty) build as before."""
    built = {}
    for name, (config, n_params) in REAL_CONFIGS.items():
        built[name] = m = fvt.build(config)
        params = list(m.parameters())
        assert all(p.device.type == "meta" for p in params), name
        assert sum(p.numel() for p in params) == n_params, name
    real = {k: b for k, b in built["Wan2.1-T2V-14B"].named_buffers() if b.device.type != "meta"}
    assert real and all(torch.isfinite(b.float()).all() for b in real.values())  # the rotary tables, for real


@pytest.mark.parametrize(("config", "limits", "match"), [
    ({"rope_max_seq_len": 10**9}, None, r"max_computed_bytes\). The config values .*'rope_max_seq_len': 1000000000"),
    ({"num_attention_heads": 10**5, "attention_head_dim": 10**5}, None,
     r"tensor of 640000000000 bytes.*max_tensor_bytes.*'attention_head_dim': 100000, 'num_attention_heads': 100000"),
    ({"num_layers": 10**5}, BuildLimits(max_modules=300), r"more than 300 modules.*max_modules.*'num_layers': 100000"),
    ({"num_layers": 10**5}, BuildLimits(max_seconds=0.2), r"took more than 0.2 s.*max_seconds.*'num_layers': 100000"),
    ({"rope_max_seq_len": 10**5, "attention_head_dim": 16}, BuildLimits(max_computed_bytes=1 << 20),
     r"more than 1048576 bytes.*'rope_max_seq_len': 100000"),
])
def test_config_values_cannot_drive_unbounded_work(config, limits, match):
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match=r"cfg\.json: building VideoDiT: .*" + match):
        fvt.build("fvt-video-dit", config, limits=limits, source="cfg.json")
    assert time.perf_counter() - t0 < 5


def test_the_limits_are_named_constants_and_a_raised_limit_builds():
    assert DEFAULT_BUILD_LIMITS == BuildLimits()
    assert DEFAULT_BUILD_LIMITS.max_modules >= 5 * 1399  # HunyuanVideo's module count, with room
    m = fvt.build("fvt-video-dit", {"num_layers": 20}, limits=BuildLimits(max_modules=10_000))
    assert len(m.blocks) == 20
    with pytest.raises(FormatError, match="max_modules"):
        fvt.build("fvt-video-dit", {"num_layers": 20}, limits=BuildLimits(max_modules=100))
    # on a real device only the module count applies: its memory is what the caller asked for
    m = fvt.build("fvt-video-dit", {"rope_max_seq_len": 4096}, device="cpu", limits=BuildLimits(max_computed_bytes=1))
    assert m.rope.freqs_cos.shape[0] == 4096


def test_load_model_names_the_config_file_and_key_of_a_rope_bomb(tmp_path):
    folder = _model_folder(tmp_path, "rope", {"_class_name": "VideoDiT", "rope_max_seq_len": 10**9})
    with pytest.raises(FormatError, match=r"rope/config\.json: building VideoDiT: .*'rope_max_seq_len': 1000000000"):
        fvt.load_model(folder)


def test_meta_parameters_is_per_thread_and_keeps_buffers_real():
    """A module built in another thread while one thread builds on meta keeps its real parameters."""
    inside, outside_done = threading.Event(), threading.Event()
    built: dict[str, torch.nn.Module] = {}

    def on_meta() -> None:
        with meta_parameters():
            inside.set()
            outside_done.wait(10)
            built["meta"] = torch.nn.Linear(2, 2)

    t = threading.Thread(target=on_meta)
    t.start()
    assert inside.wait(10)
    built["real"] = torch.nn.Linear(2, 2)
    outside_done.set()
    t.join(10)
    assert built["real"].weight.device.type == "cpu"
    assert built["meta"].weight.device.type == "meta"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # nothing left behind after the context
    m = fvt.build("fvt-video-dit")
    assert m.rope.freqs_cos.device.type == "cpu" and all(p.device.type == "meta" for p in m.parameters())


def _module_machinery() -> dict[str, dict[str, object]]:
    """Every attribute of the classes and module a meta build could patch, by identity."""
    import torch.nn.modules.module as module_mod

    spaces = {"nn.Module": vars(torch.nn.Module), "nn.Parameter": vars(torch.nn.Parameter),
              "nn.Linear": vars(torch.nn.Linear), "torch.nn.modules.module": vars(module_mod)}
    return {name: dict(space) for name, space in spaces.items()}


def test_meta_parameters_changes_nothing_outside_its_thread_and_context():
    """Building on meta acts only in the thread inside the context: another thread (even one that inherits the
    context, as Python 3.14's free-threaded build does for new threads), code after the context (also after an
    error inside it) and nn.Module's attributes are untouched. The one process-wide change is the registration
    hooks, installed once."""
    import contextvars

    import torch.nn.modules.module as module_mod

    with meta_parameters():  # the hooks are installed by the first context of the process
        pass
    hooks = [dict(h) for h in (module_mod._global_parameter_registration_hooks,
                               module_mod._global_module_registration_hooks, module_mod._global_buffer_registration_hooks)]
    before = _module_machinery()
    built: dict[str, torch.nn.Module] = {}

    def build(name: str) -> None:
        built[name] = torch.nn.Linear(2, 2)

    with meta_parameters():
        inside = _module_machinery()
        plain = threading.Thread(target=build, args=("thread",))
        inherited = threading.Thread(target=contextvars.copy_context().run, args=(build, "inherited"))
        for t in (plain, inherited):
            t.start()
            t.join(10)
        build("here")
        with meta_parameters():  # nested: the inner exit leaves the outer in force
            pass
        build("here, after a nested context")
    with pytest.raises(RuntimeError, match="boom"), meta_parameters():
        raise RuntimeError("boom")
    build("after")
    devices = {name: m.weight.device.type for name, m in built.items()}
    assert devices == {"thread": "cpu", "inherited": "cpu", "here": "meta", "here, after a nested context": "meta",
                       "after": "cpu"}
    for name in before:  # no attribute patched, added or removed, inside the context or after it
        for seen in (inside, _module_machinery()):
            changed = {a for a in before[name].keys() | seen[name].keys() if before[name].get(a) is not seen[name].get(a)}
            assert not changed, f"{name}: attributes changed by meta_parameters(): {sorted(changed)}"
    after = [dict(h) for h in (module_mod._global_parameter_registration_hooks,
                               module_mod._global_module_registration_hooks, module_mod._global_buffer_registration_hooks)]
    assert after == hooks, "meta_parameters() installs its hooks once for the process, never again"


# ----------------------------------------------------------------------------- the JSON reader
def _read_in_thread(path: Path, seconds: float = 5.0) -> BaseException | object:
    """read_json in a daemon thread: a reader that blocks (a FIFO) fails the test instead of hanging it."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(read_json(path))
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"read_json({path}) blocked for {seconds} s"
    return box[0]


def test_read_json_opens_regular_files_only(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    err = _read_in_thread(fifo)
    assert isinstance(err, UnsafeFileError) and re.search(r"config\.json: the JSON file is a FIFO \(named pipe\), not a regular file", str(err))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UnsafeFileError, match=r"dir\.json: the JSON file is a folder, not a regular file"):
        read_json(tmp_path / "dir.json")
    with pytest.raises(NotFoundError, match=r"nope\.json: no such JSON file"):
        read_json(tmp_path / "nope.json")
    err = _read_in_thread(Path("/dev/zero"))
    assert isinstance(err, UnsafeFileError) and "character device" in str(err)


@pytest.mark.parametrize(("text", "match"), [
    ('{"num_layers": 1' + "0" * 5000 + "}", r"key 'num_layers': an integer of 5001 digits, more than 64"),
    ('{"a": {"eps": NaN}}', r"key 'eps': NaN is not JSON"),
    ('{"eps": -Infinity}', r"key 'eps': -Infinity is not JSON"),
    ('{"r": 8, "r": 9}', r"key 'r' appears twice"),
    ('{"\\ud800": 1}', r"a key at \(the document\) holds a lone surrogate"),
    ('{"a": ["ok", "\\udfff"]}', r"a value at a\[1\] holds a lone surrogate"),
    ('{"a": ' * 40 + "1" + "}" * 40, r"nesting deeper than 32 levels at a\.a\.a"),
    ("[" * 50_000 + "]" * 50_000, r"nesting deeper than 32 levels"),
    ("[" + "{}," * 200_000 + "{}]", r"about 200002 objects and arrays, more than 100000"),
    ("[" + "1," * 600_000 + "1]", r"about 600001 values, more than 500000"),
    ("[1, 2]", r"the document must be an object; found an array"),
    ("{nope", r"not valid JSON \(Expecting property name"),
    ("", r"not valid JSON"),
])
def test_read_json_refuses_hostile_documents_with_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    err = _read_in_thread(path)
    assert isinstance(err, FormatError), repr(err)
    assert re.search(r"config\.json: " + match, str(err)), str(err)


def test_read_json_size_and_encoding(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * (8 << 20) + b'"}')
    with pytest.raises(FormatError, match=r"big\.json: the JSON file is 8388617 bytes, over the 8388608-byte limit"):
        read_json(big)
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(FormatError, match=r"latin1\.json: not valid UTF-8 at byte 7"):
        read_json(bad)
    ok = tmp_path / "ok.json"
    ok.write_text('{"a": [1, 2.5, "x", null, true], "b": {"c": -3}}')
    assert read_json(ok) == {"a": [1, 2.5, "x", None, True], "b": {"c": -3}}
    assert read_json_file(ok, limits=JsonLimits(max_depth=2), expect=None)["b"] == {"c": -3}
    ok.write_text('{"b": {"c": -3}}')
    with pytest.raises(FormatError, match=r"ok\.json: nesting deeper than 1 levels at b"):
        read_json_file(ok, limits=JsonLimits(max_depth=1))


def test_typed_fields():
    assert get_field({"r": 4}, "r", int, source="a.json") == 4
    assert get_field({}, "r", int, source="a.json", default=8) == 8
    with pytest.raises(FormatError, match=r"a\.json: the key 'r' is missing; it must be an integer"):
        get_field({}, "r", int, source="a.json")
    with pytest.raises(FormatError, match=r"a\.json: key 'lora_alpha' must be an integer or a number; found null"):
        get_field({"lora_alpha": None}, "lora_alpha", (int, float), source="a.json")
    with pytest.raises(FormatError, match=r"key 'r' must be an integer; found true/false \(True\)"):
        check_type(True, int, source="a.json", key="r")
    with pytest.raises(FormatError, match=r"key 'target_modules' must be an array; found an object"):
        check_type({"q": 1}, list, source="a.json", key="target_modules")
    assert loads_json(b'{"a": 1}', source="m", expect=dict) == {"a": 1}


def test_autoencoder_classes_are_models_not_auto_loaders():
    """``AutoencoderKL`` starts with "Auto" but is a diffusers model: it builds; ``AutoModel`` stays refused."""
    module = fvt.build({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "block_out_channels": [8],
                        "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
                        "latent_channels": 2, "norm_num_groups": 8, "layers_per_block": 1})
    assert type(module).__name__ == "AutoencoderKL"
    with pytest.raises(RegistryError, match=r"'AutoModel'.*an Auto class"):
        fvt.build({"_class_name": "AutoModel", "_diffusers_version": "0.30.0"})
