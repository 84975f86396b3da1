"""``fvt.lora.split_experts``: one LoRA file for Wan2.2's two experts -> one adapter per expert (issue 16, item 2).

The oracle is diffusers + peft: a file with ``transformer.*`` and ``transformer_2.*`` keys (diffusers'
component prefixes) is read by each expert model's ``load_lora_adapter(sd, prefix=<component>)``, the way
``WanPipeline`` reads a file's keys for one component; the merged forward of each expert must match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError, UsageError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from _wan_pipeline import TRANSFORMER  # noqa: E402

TARGETS = {"transformer": "blocks.*.attn1.to_q.weight", "transformer_2": "blocks.*.ffn.net.0.proj.weight"}


@pytest.fixture(scope="module")
def experts():
    """Two tiny Wan experts (different weights), and per expert an adapter on different modules."""
    out = {}
    for i, name in enumerate(TARGETS):
        torch.manual_seed(i)
        model = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
        tree = fvt.ParamTree.from_module(model)
        adapter = fvt.lora.random_adapter(tree, targets=TARGETS[name], rank=2, alpha=2.0, seed=i + 10)
        out[name] = (model, tree, adapter)
    return out


def _both(experts, folder: Path) -> Path:
    """One file with both experts' LoRA under their component prefixes, as diffusers names them (no header)."""
    data: dict[str, torch.Tensor] = {}
    for name, (_m, _t, adapter) in experts.items():
        f = fvt.lora.save(adapter, folder / name, format="diffusers", component=name)
        data.update(load_file(f))
    assert {k.split(".")[0] for k in data} == {"transformer", "transformer_2"}
    path = folder / "both.safetensors"
    save_file(data, path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 6, 16, generator=g))


def test_each_expert_gets_its_own_adapter_like_diffusers(experts, tmp_path):
    path = _both(experts, tmp_path)
    split = fvt.lora.split_experts(path, {n: t for n, (_m, t, _a) in experts.items()})
    assert list(split) == ["transformer", "transformer_2"]
    state = load_file(path)
    for name, (model, tree, adapter) in experts.items():
        assert list(split[name]) == list(adapter) and split[name].report.skipped == ()
        merged = fvt.lora.merge(tree, split[name])
        with torch.no_grad():
            got = fvt.call(model, merged, *_inputs()).sample
        ref = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
        ref.load_state_dict(model.state_dict())
        ref.load_lora_adapter(state, prefix=name, adapter_name="x")
        with torch.no_grad():
            expected = ref(*_inputs()).sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert not torch.allclose(got, model(*_inputs()).sample, atol=1e-4)  # the LoRA does something


def test_keys_that_fit_neither_expert_are_named(experts, tmp_path):
    path = _both(experts, tmp_path)
    data = load_file(path)
    data["diffusion_model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(2, 16)
    save_file(data, tmp_path / "mixed.safetensors")
    bases = {n: t for n, (_m, t, _a) in experts.items()}
    with pytest.raises(KeyMismatchError, match=r"mixed\.safetensors: 1 LoRA keys fit none of the experts \['transformer', 'transformer_2'\].*'diffusion_model\.blocks\.0\.self_attn\.q\.lora_A\.weight'.*Fix"):
        fvt.lora.split_experts(tmp_path / "mixed.safetensors", bases)
    with pytest.raises(KeyMismatchError, match="fit none of the experts"):
        fvt.lora.split_experts(tmp_path / "mixed.safetensors", bases, strict=False)


def test_a_one_expert_file_is_refused_strictly_and_empty_otherwise(experts, tmp_path):
    name, (_m, _tree, adapter) = "transformer", experts["transformer"]
    f = fvt.lora.save(adapter, tmp_path / "one", format="diffusers", component=name)
    bases = {n: t for n, (_m, t, _a) in experts.items()}
    with pytest.raises(KeyMismatchError, match=r"carries no LoRA for expert\(s\) \['transformer_2'\].*Fix"):
        fvt.lora.split_experts(f, bases)
    split = fvt.lora.split_experts(f, bases, strict=False)
    assert list(split["transformer"]) == list(adapter) and len(split["transformer_2"]) == 0


def test_an_experts_keys_must_resolve_to_its_own_base(experts, tmp_path):
    path = _both(experts, tmp_path)
    small = fvt.select(experts["transformer_2"][1], "blocks.0.*")  # the expert's base lacks block 1
    bases = {"transformer": experts["transformer"][1], "transformer_2": small}
    with pytest.raises(KeyMismatchError, match=r"both\.safetensors: expert 'transformer_2': 2 LoRA keys do not resolve to its base:\n  transformer_2\.blocks\.1\.ffn\.net\.0\.proj\.lora_A\.weight: no base module matches"):
        fvt.lora.split_experts(path, bases)
    split = fvt.lora.split_experts(path, bases, strict=False)
    assert list(split["transformer_2"]) == ["blocks.0.ffn.net.0.proj.weight"]
    assert sorted(k for k, _ in split["transformer_2"].report.skipped) == [
        "transformer_2.blocks.1.ffn.net.0.proj.lora_A.weight", "transformer_2.blocks.1.ffn.net.0.proj.lora_B.weight"]


def test_bases_must_name_the_experts(experts, tmp_path):
    with pytest.raises(UsageError, match=r"bases must map each expert's component name to its base tree"):
        fvt.lora.split_experts(_both(experts, tmp_path), [experts["transformer"][1]])  # type: ignore[arg-type]
