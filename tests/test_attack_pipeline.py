"""Findings of an outside test of load_pipeline, bind, split_experts and original single files (branch i16-attack).

Each test asserts the documented behaviour (docs/security.md, docs/guides/load-and-run.md, the docstrings) and
fails on the code as found.
"""
import json
import shutil
import threading

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FvTransformError, KeyMismatchError

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("pipe") / "wan"
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(**TINY).save_pretrained(root / "transformer")
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _copy(pipeline_dir, tmp_path, **index_update):
    root = tmp_path / "p"
    shutil.copytree(pipeline_dir, root)
    index = json.loads((root / "model_index.json").read_text())
    index.update(index_update)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


# --- fvt.bind -------------------------------------------------------------------------------------------------

def test_bind_in_two_threads_on_one_module_restores_the_module_own_parameters():
    # Promise: "bind restores the module on exit". Two threads bind one module (two requests served by one
    # pipeline): A enters, B enters, A exits, B exits. After both blocks the module must hold its own
    # parameter again (or the second bind must be refused). Found: it is left bound to A's tree for good, so
    # any later in-place update of the module writes into that caller's tree.
    lin = torch.nn.Linear(2, 1)
    own = lin.weight
    t1 = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    t2 = {"weight": torch.full((1, 2), 2.0), "bias": torch.zeros(1)}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def a():
        with fvt.bind(lin, t1):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        try:
            with fvt.bind(lin, t2):
                b_in.set()
                a_out.wait(5)
        except FvTransformError as e:  # refusing the concurrent bind is acceptable too
            b_in.set()
            errors.append(e)

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(); tb.start(); ta.join(10); tb.join(10)
    assert lin.weight is own, f"module left bound to a tree: {lin.weight.data}"


def test_bind_a_tree_value_that_is_not_a_tensor_is_a_typed_error():
    # Promise: typed errors; bind documents KeyMismatchError / ShapeMismatchError / UsageError.
    # Found: a raw AttributeError ('list' object has no attribute 'shape').
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(FvTransformError):
        with fvt.bind(lin, {"weight": [[1.0, 1.0], [1.0, 1.0]], "bias": torch.zeros(2)}):
            pass


# --- fvt.lora.split_experts ------------------------------------------------------------------------------------

def test_split_experts_takes_any_component_name_as_its_docstring_says():
    # Docstring: "Each key of the file must start with one expert's name and a dot; its adapter is resolved
    # against that expert's base". Found: only some names work (transformer, transformer_2, unet,
    # text_encoder); 'transformer_3' or 'prior' keys "do not resolve to its base" although they fit it exactly.
    base = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    for name in ["transformer", "transformer_3"]:
        file = {f"{name}.l.lora_A.weight": a, f"{name}.l.lora_B.weight": b}
        experts = fvt.lora.split_experts(file, {name: base})
        assert list(experts[name]) == ["l.weight"], name


def test_split_experts_a_key_that_fits_two_experts_is_not_given_to_both():
    # Component names may hold '.' (the pipeline check allows it). With experts 'transformer.x' and
    # 'transformer', the key 'transformer.x.l.lora_A.weight' fits both prefixes. Found: it is applied to BOTH
    # experts (to 'l.weight' of one and 'x.l.weight' of the other); in the other order of bases the call fails
    # claiming the file has no key for 'transformer.x'. Expected: an ambiguity error (or one expert only).
    base = fvt.ParamTree({"l.weight": torch.zeros(4, 3), "x.l.weight": torch.zeros(4, 3)})
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    file = {"transformer.x.l.lora_A.weight": a, "transformer.x.l.lora_B.weight": b,
            "transformer.l.lora_A.weight": a, "transformer.l.lora_B.weight": b}
    try:
        experts = fvt.lora.split_experts(file, {"transformer.x": base, "transformer": base})
    except KeyMismatchError:
        return
    n_targets = sum(len(e) for e in experts.values())
    assert n_targets == 2, {n: list(e) for n, e in experts.items()}  # two LoRA modules in the file, not three


# --- fvt.save(rename=) -----------------------------------------------------------------------------------------

def test_save_refuses_a_key_renamed_to___metadata__(tmp_path):
    # '__metadata__' is a name no tensor can have (docs/security.md, aliases). Found: save(rename=...) writes it
    # as a tensor entry, silently drops metadata=, and the file it wrote is refused by fvt.load (and by
    # safetensors). A writer must not produce a file its own reader rejects.
    t = fvt.ParamTree({"a": torch.ones(2), "b": torch.zeros(2)})
    path = tmp_path / "m.safetensors"
    try:
        fvt.save(t, path, rename={"a": "__metadata__"}, metadata={"x": "y"})
    except FvTransformError:
        return
    back = fvt.load(path)  # raises FormatError now
    assert set(back) == {"__metadata__", "b"}


# --- fvt.load_pipeline -----------------------------------------------------------------------------------------

def test_load_pipeline_components_as_a_generator_is_not_a_silent_empty_pipeline(pipeline_dir):
    # components=[] is a UsageError (no silent empty loads). Found: a generator passes the check, is used up by
    # it, and the call returns a pipeline with no component loaded.
    try:
        pipe = fvt.load_pipeline(pipeline_dir, (n for n in ["transformer"]))
    except FvTransformError:
        return
    assert sorted(pipe) == ["transformer"]


def test_model_index_entry_with_one_null_is_a_format_error(pipeline_dir, tmp_path):
    # The index check says an entry "must be [library, class] (two strings, or two nulls for an absent
    # component)". Found: ["diffusers", null] is taken as absent and the component silently not loaded.
    root = _copy(pipeline_dir, tmp_path, transformer=["diffusers", None])
    with pytest.raises(FvTransformError):
        fvt.load_pipeline(root)


def test_model_index_class_that_disagrees_with_config_is_not_ignored(pipeline_dir, tmp_path):
    # model_index.json says 'transformer' is an AutoencoderKLWan (diffusers would build that class); the
    # folder's config.json says WanTransformer3DModel. Found: the index's class is ignored silently (so are
    # ["os", "system"] and ["diffusers", "FlowMatchEulerDiscreteScheduler"]). Strict by default: refuse.
    root = _copy(pipeline_dir, tmp_path, transformer=["diffusers", "AutoencoderKLWan"])
    with pytest.raises(FvTransformError):
        fvt.load_pipeline(root)


def test_load_pipeline_integer_dtype_is_a_typed_error(pipeline_dir):
    # Found: torch.int8 passes the "dtype is a torch.dtype" check and ends in a raw RuntimeError
    # ("Only Tensors of floating point and complex dtype can require gradients"). Same in load_model.
    with pytest.raises(FvTransformError):
        fvt.load_pipeline(pipeline_dir, dtype=torch.int8)


def test_load_pipeline_bad_device_is_a_typed_error(pipeline_dir):
    # Found: a raw RuntimeError from torch.device parsing. Same in load_model.
    with pytest.raises(FvTransformError):
        fvt.load_pipeline(pipeline_dir, device="bogus")


# --- fvt.load_model(single file, layout=) ------------------------------------------------------------------------

def test_load_model_layout_that_is_not_a_string_is_a_usage_error(pipeline_dir, tmp_path):
    # Found: layout=3 raises a raw TypeError ('int' object is not iterable).
    tree = fvt.load(pipeline_dir / "transformer")
    path = tmp_path / "wan_original.safetensors"
    fvt.save(fvt.rename(tree, fvt.io.WAN_DIFFUSERS_TO_ORIGINAL), path)
    with pytest.raises(FvTransformError):
        fvt.load_model(path, config=pipeline_dir / "transformer", layout=3)
