import sys

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, MissingDependencyError, RegistryError, UsageError


def test_register_resolve_build_on_meta():
    reg = fvt.Registry()
    fvt.register("mlp", "torch.nn:Linear", registry=reg)
    with pytest.raises(RegistryError, match="is taken"):
        fvt.register("mlp", torch.nn.Linear, registry=reg)
    fvt.register("mlp", torch.nn.Linear, override=True, registry=reg)
    m = fvt.build("mlp", {"in_features": 1000, "out_features": 1000}, registry=reg)
    assert m.weight.device.type == "meta"
    m_cpu = fvt.build("mlp", {"in_features": 2, "out_features": 3}, device="cpu", dtype=torch.float16, registry=reg)
    assert m_cpu.weight.dtype == torch.float16 and m_cpu.weight.device.type == "cpu"

    @fvt.register("deco", registry=reg)
    class Deco(torch.nn.Module):
        def __init__(self, n: int = 2):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(n))

    assert fvt.resolve("deco", registry=reg) is Deco
    reg.unregister("deco")
    with pytest.raises(RegistryError, match="not registered"):
        reg.unregister("deco")


def test_unknown_names_keep_the_name_and_suggest():
    with pytest.raises(RegistryError, match=r"unknown architecture 'WanTransformer3DModle'.*close matches: \['WanTransformer3DModel'"):
        fvt.resolve("WanTransformer3DModle")


def test_bad_entries():
    reg = fvt.Registry()
    with pytest.raises(UsageError, match="non-empty str"):
        reg.register("", torch.nn.Linear)
    with pytest.raises(RegistryError, match="expected a callable"):
        reg.register("x", 3)
    reg.register("bad", "no_colon")
    with pytest.raises(RegistryError, match="not of the form"):
        reg.resolve("bad")
    reg.register("missing_attr", "torch.nn:NoSuchThing")
    with pytest.raises(RegistryError, match="has no attribute 'NoSuchThing'"):
        reg.resolve("missing_attr")
    reg.register("not_module", "math:pi")
    with pytest.raises(RegistryError, match="not callable"):
        reg.resolve("not_module")
    with pytest.raises(FormatError, match="neither '_class_name'"):
        fvt.resolve({"hidden": 3})
    with pytest.raises(UsageError, match="takes a name or a config dict"):
        fvt.resolve(3)


def test_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fvtransform\[diffusers\]'"):
        fvt.resolve("WanTransformer3DModel")
    with pytest.raises(MissingDependencyError, match=r"fvtransform\[diffusers\]"):
        fvt.resolve({"_class_name": "SomeUnregisteredDiffusersModel"})


def test_config_dicts_resolve_with_fallbacks():
    from diffusers import WanTransformer3DModel
    from transformers import BertModel

    assert fvt.resolve({"_class_name": "WanTransformer3DModel"}) is WanTransformer3DModel
    assert fvt.resolve({"architectures": ["NoSuchArch", "BertModel"]}) is BertModel
    with pytest.raises(RegistryError, match="not registered and not a class of diffusers"):
        fvt.resolve({"_class_name": "NoSuchDiffusersClass"})
    with pytest.raises(RegistryError, match="no architecture of"):
        fvt.resolve({"architectures": ["NoSuchArchAtAll"]})


def test_builtin_entries_resolve():
    from fvtransform.registry._builtins import BUILTIN_ENTRIES

    for name in BUILTIN_ENTRIES:
        assert callable(fvt.resolve(name)), name


def test_reference_model_builds_without_memory_and_keeps_rope_real():
    m = fvt.build("fvt-video-dit", {"num_layers": 3})
    assert len(m.blocks) == 3
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.rope.freqs_cos.device.type == "cpu" and torch.isfinite(m.rope.freqs_cos).all()
