"""``fvt.load_pipeline`` against diffusers' own ``WanPipeline.from_pretrained`` (issue 16, items 1 and 2).

The oracle is diffusers 0.42 / transformers 5.x themselves: a tiny Wan2.2-style pipeline (two transformers,
a UMT5 text encoder, a Wan VAE, a tokenizer, a scheduler) is made with their classes and written with
``WanPipeline.save_pretrained`` (tests/_wan_pipeline.py); ``WanPipeline.from_pretrained(..., torch_dtype=...)``
of the same folder gives the keys, dtypes, values and forward outputs each component must match bit for bit,
and the latents a 2-step denoising run must match when our trees are bound into meta modules.
"""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, ImmutableError, KeyMismatchError, NotFoundError, UsageError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _wan_pipeline import make_pipeline  # noqa: E402

MODELS = ["text_encoder", "transformer", "transformer_2", "vae"]


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wan22") / "pipe"
    make_pipeline(folder, two_experts=True)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pipe"
    shutil.copytree(folder, out)
    return out


def _forward(name: str, module: torch.nn.Module, tree: fvt.ParamTree | None, dt: torch.dtype) -> torch.Tensor:
    """The component's forward on fixed inputs (floating inputs in ``dt``), through fvt.call or the module itself."""
    g = torch.Generator().manual_seed(0)
    if name == "text_encoder":
        args: tuple = (torch.tensor([[3, 4, 5, 6, 1, 0]]),)
        kwargs = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    elif name == "vae":
        args, kwargs = (torch.randn(1, 3, 5, 16, 16, generator=g).to(dt),), {}
    else:
        args = (torch.randn(1, 4, 2, 8, 8, generator=g).to(dt), torch.tensor([500]),
                torch.randn(1, 6, 16, generator=g).to(dt))
        kwargs = {}
    with torch.no_grad():
        out = fvt.call(module, tree, *args, **kwargs) if tree is not None else module(*args, **kwargs)
    return out.sample if name == "vae" else (out.last_hidden_state if name == "text_encoder" else out.sample)


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, {"default": torch.bfloat16, "text_encoder": torch.float16}],
                         ids=["bf16", "per-component"])
def test_each_component_matches_from_pretrained_bit_for_bit(pipe_folder, torch_dtype):
    if isinstance(torch_dtype, dict):
        kw = {"dtype": torch_dtype["default"], "dtypes": {"text_encoder": torch_dtype["text_encoder"]}}
    else:
        kw = {"dtype": torch_dtype}
    ref = diffusers.WanPipeline.from_pretrained(pipe_folder, dtype=torch_dtype)
    ours = fvt.load_pipeline(pipe_folder, **kw)
    assert sorted(ours) == MODELS
    for name in MODELS:
        module, tree = ours[name]
        expected = getattr(ref, name).state_dict()
        assert sorted(tree) == sorted(expected), name
        assert {k: t.dtype for k, t in tree.items()} == {k: t.dtype for k, t in expected.items()}, name
        assert all(torch.equal(tree[k], expected[k]) for k in expected), name
        if name != "vae":  # the VAE forward is checked in float32 below (bf16 3-D convolutions are slow on CPU)
            dt = kw["dtype"]
            assert torch.equal(_forward(name, module, tree, dt), _forward(name, getattr(ref, name), None, dt)), name
    # the class's keep-in-float32 declarations hold per component, as diffusers/transformers apply them
    assert ours["transformer"].tree["scale_shift_table"].dtype == torch.float32
    te_dtypes = {t.dtype for k, t in ours["text_encoder"].tree.items() if ".wo." in k}
    assert te_dtypes == ({torch.float32} if isinstance(torch_dtype, dict) else {torch.bfloat16})


def test_vae_forward_matches_from_pretrained(pipe_folder):
    ref = diffusers.AutoencoderKLWan.from_pretrained(pipe_folder / "vae")
    module, tree = fvt.load_pipeline(pipe_folder, ["vae"])["vae"]
    assert torch.equal(_forward("vae", module, tree, torch.float32), _forward("vae", ref, None, torch.float32))


def _run(pipe, steps: int = 2) -> torch.Tensor:
    out = pipe(prompt="a cat on the moon", negative_prompt="blurry", height=16, width=16, num_frames=5,
               num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0, max_sequence_length=8,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    return out.frames


def test_pipeline_runs_on_bound_trees_like_its_own_weights(pipe_folder):
    ref = diffusers.WanPipeline.from_pretrained(pipe_folder)
    expected = _run(ref)
    ours = fvt.load_pipeline(pipe_folder)
    assert {"tokenizer", "scheduler"} <= set(ours.entries) and ours.config["boundary_ratio"] == 0.5
    sched = ours.entries["scheduler"]
    pipe = diffusers.WanPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(ours.entries["tokenizer"].folder),
        scheduler=getattr(diffusers, sched.class_name).from_pretrained(sched.folder),
        boundary_ratio=ours.config["boundary_ratio"],
        **{name: ours[name].module for name in MODELS},
    )
    assert all(p.is_meta for p in pipe.transformer.parameters())
    with fvt.bind(pipe.text_encoder, ours["text_encoder"].tree), fvt.bind(pipe.vae, ours["vae"].tree), \
            fvt.bind(pipe.transformer, ours["transformer"].tree), fvt.bind(pipe.transformer_2, ours["transformer_2"].tree):
        got = _run(pipe)
    assert torch.equal(got, expected)
    assert all(p.is_meta for p in pipe.transformer.parameters())  # restored: the module holds no weights again
    # a merged tree swapped into the stateful pipeline and out again, nothing reloaded
    adapter = fvt.lora.random_adapter(ours["transformer_2"].tree, targets="blocks.*.attn1.to_q.weight", rank=2, seed=1)
    merged = fvt.lora.merge(ours["transformer_2"].tree, adapter, scale=4.0)
    with fvt.bind(ref.transformer_2, merged):
        assert not torch.equal(_run(ref), expected)
    assert torch.equal(_run(ref), expected)


def test_only_requested_components_are_read_and_the_value_is_immutable(pipe_folder):
    pipe = fvt.load_pipeline(pipe_folder, ["transformer", "scheduler"], dtype=torch.bfloat16)
    assert list(pipe) == ["transformer"] and list(pipe.entries) == ["scheduler"]
    assert pipe.entries["scheduler"].folder == pipe_folder / "scheduler" and pipe.class_name == "WanPipeline"
    with pytest.raises(ImmutableError, match="a Pipeline is immutable; cannot set 'folder'"):
        pipe.folder = Path("/")  # type: ignore[misc]
    with pytest.raises(TypeError):
        pipe.config["boundary_ratio"] = 1.0  # type: ignore[index]
    with pytest.raises(KeyError, match=r"'scheduler' holds no weights; it is pipe.entries\['scheduler'\]"):
        pipe["scheduler"]
    with pytest.raises(KeyError, match=r"did you mean \['transformer'\]"):
        pipe["transformr"]


def test_null_entries_are_absent_not_errors(pipe_folder, tmp_path):
    folder = _copy(pipe_folder, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer_2"] = [None, None]
    index["image_encoder"] = None
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "transformer_2")
    pipe = fvt.load_pipeline(folder, dtype=torch.bfloat16)
    assert sorted(pipe) == ["text_encoder", "transformer", "vae"] and sorted(pipe.entries) == ["scheduler", "tokenizer"]


def test_a_component_folder_missing_its_weights_names_the_component(pipe_folder, tmp_path):
    folder = _copy(pipe_folder, tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(NotFoundError, match=r"pipe: component 'vae' \(diffusers\.AutoencoderKLWan\): .*vae: no weights found.*Fix: complete .*vae/ as the pipeline's repo has it"):
        fvt.load_pipeline(folder, ["vae"])
    shutil.rmtree(folder / "vae")
    with pytest.raises(NotFoundError, match=r"component 'vae' \(diffusers\.AutoencoderKLWan\) has no folder vae/\. Fix"):
        fvt.load_pipeline(folder, ["vae"])


def test_a_model_folder_without_config_is_an_error_not_an_entry(pipe_folder, tmp_path):
    folder = _copy(pipe_folder, tmp_path)
    (folder / "transformer" / "config.json").unlink()
    with pytest.raises(NotFoundError, match=r"component 'transformer' \(diffusers\.WanTransformer3DModel\) has no transformer/config\.json"):
        fvt.load_pipeline(folder, ["transformer"])


def test_unknown_component_lists_close_names(pipe_folder):
    with pytest.raises(NotFoundError, match=r"no component 'transformer_3'; components: \[.*\]; did you mean \['transformer_2', 'transformer'\]"):
        fvt.load_pipeline(pipe_folder, ["transformer_3"])


def test_caller_mistakes_are_usage_errors(pipe_folder):
    with pytest.raises(UsageError, match=r"components must be a list of names; found 'transformer'"):
        fvt.load_pipeline(pipe_folder, "transformer")  # type: ignore[arg-type]
    # one dtype converter (fvtransform._dtypes.as_dtype): names are taken, non-floating dtypes refused
    with pytest.raises(UsageError, match=r"dtype 'bf17': expected a floating torch.dtype"):
        fvt.load_pipeline(pipe_folder, ["vae"], dtype="bf17")
    with pytest.raises(UsageError, match=r"dtypes\['vae'\] torch.int8: expected a floating torch.dtype"):
        fvt.load_pipeline(pipe_folder, ["vae"], dtypes={"vae": torch.int8})
    with pytest.raises(UsageError, match=r"dtype must be a torch.dtype"):
        fvt.load_pipeline(pipe_folder, ["vae"], dtype=16)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"device 'bogus' is not a device torch knows"):
        fvt.load_pipeline(pipe_folder, ["vae"], device="bogus")
    with pytest.raises(UsageError, match=r"dtypes names \['text_encoderr'\].*close names: \{'text_encoderr': \['text_encoder'\]\}"):
        fvt.load_pipeline(pipe_folder, ["text_encoder"], dtypes={"text_encoderr": torch.float32})


def test_a_model_folder_is_not_a_pipeline(pipe_folder):
    with pytest.raises(NotFoundError, match=r"transformer: not a diffusers pipeline \(no model_index\.json\).*fvt\.load_model"):
        fvt.load_pipeline(pipe_folder / "transformer")


def test_strict_errors_name_the_component(pipe_folder, tmp_path):
    folder = _copy(pipe_folder, tmp_path)
    from safetensors.torch import load_file, save_file

    f = folder / "transformer_2" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, f)
    with pytest.raises(KeyMismatchError, match=r"(?s)component 'transformer_2' \(diffusers\.WanTransformer3DModel\): .*extra\.weight"):
        fvt.load_pipeline(folder, ["transformer_2"])
    pipe = fvt.load_pipeline(folder, ["transformer_2"], strict=False)  # no warning: the report lists it
    assert pipe["transformer_2"].report.unexpected == ("extra.weight",)


def test_repo_id_downloads_only_the_requested_components(pipe_folder, fake_hub):
    fake_hub.add_commit("org/tiny-wan22", _files(pipe_folder))
    pipe = fvt.load_pipeline("org/tiny-wan22", ["transformer_2", "scheduler"])
    fetched = {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p}
    assert {f.split("/")[0] for f in fetched} == {"model_index.json", "transformer_2", "scheduler"}
    assert list(pipe) == ["transformer_2"] and pipe.entries["scheduler"].folder is not None
    ref = diffusers.WanTransformer3DModel.from_pretrained(pipe_folder / "transformer_2").state_dict()
    assert all(torch.equal(pipe["transformer_2"].tree[k], v) for k, v in ref.items())


def test_a_tree_miss_through_get_searches_no_close_names(monkeypatch):
    """``tree.get`` is how loaders ask "is it there?" for every slot of a module (load_model's dtype pass):
    a miss must cost a dict lookup, not a difflib search over every key (0.13 s of a tiny pipeline's 0.45 s)."""
    import fvtransform._messages

    tree = fvt.ParamTree({"a.weight": torch.zeros(1)})
    monkeypatch.setattr(fvtransform._messages, "close_matches", lambda *a, **k: pytest.fail("close_matches on a get miss"))
    assert tree.get("a.wieght") is None and tree.get("x", 1) == 1 and tree.get("a.weight") is tree["a.weight"]


def test_an_empty_component_list_is_a_usage_error_not_a_whole_download(pipe_folder, fake_hub):
    fake_hub.add_commit("org/tiny-wan22", _files(pipe_folder))
    with pytest.raises(UsageError, match=r"components=\[\] names no component.*Fix: components=None"):
        fvt.load_pipeline("org/tiny-wan22", [])
    assert not [p for m, p in fake_hub.requests if "/resolve/" in p]  # nothing downloaded


@pytest.mark.parametrize("entry", [["diffusers", None], [None, "WanTransformer3DModel"]])
def test_an_entry_with_one_null_is_a_format_error(pipe_folder, tmp_path, entry):
    folder = _copy(pipe_folder, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer_2"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"model_index\.json: key 'transformer_2' must be \[library, class\] \(two strings, or two nulls"):
        fvt.load_pipeline(folder, ["vae"])


@pytest.mark.parametrize("entry", [["diffusers", "AutoencoderKLWan"], ["os", "system"]])
def test_an_index_class_that_disagrees_with_config_json_is_a_format_error_whatever_strict(pipe_folder, tmp_path, entry):
    folder = _copy(pipe_folder, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer_2"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=rf"component 'transformer_2' .*names it {'.'.join(entry)}, but its "
                                          r"transformer_2/config\.json says _class_name 'WanTransformer3DModel'.*Fix"):
        fvt.load_pipeline(folder, ["transformer_2"], strict=False)


def test_components_as_a_generator_are_read_once(pipe_folder):
    pipe = fvt.load_pipeline(pipe_folder, (n for n in ["vae", "scheduler"]))
    assert list(pipe) == ["vae"] and list(pipe.entries) == ["scheduler"]
