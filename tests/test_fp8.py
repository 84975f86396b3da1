"""Float8 trees (issue 17, part A): the scaled-fp8 layout, quantize / dequantize, running them, their errors.

Oracles:

* plain layout: diffusers' layerwise casting (``enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
  compute_dtype=torch.bfloat16)``) on a tiny ``WanTransformer3DModel``: the same float8 bytes, the same output.
* scaled layout: ComfyUI (comfyanonymous/ComfyUI) is not importable here without its app (``comfy.ops``
  imports ``comfy.model_management``, ``comfy.cli_args`` and the rest), so nothing of it runs; the layout
  its readers expect is checked key by key, as read in its source:
  ``comfy/model_detection.py`` ``model_config_from_unet``: ``scaled_fp8_key = "{}scaled_fp8".format(unet_key_prefix)``,
  ``state_dict.pop(scaled_fp8_key)``, its ``.dtype`` is the weights' float8 dtype, ``torch.float32`` meaning
  ``torch.float8_e4m3fn``; ``comfy/ops.py`` ``scaled_fp8_ops``: ``scale_weight`` / ``scale_input`` are
  ``Parameter(torch.ones((), dtype=torch.float32))`` of each Linear, the forward uses
  ``weight.to(dtype) * scale_weight`` (``convert_weight``: ``weight * self.scale_weight``);
  ``comfy/utils.py`` ``convert_old_quants``: ``k.endswith(".scale_weight")`` -> ``"{layer}.weight_scale"``,
  ``scale_input`` dropped when ``w.item() == 1.0``, a 2-element marker asks for full-precision matmul.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch

import fvtransform as fvt
from fvtransform import _fp8
from fvtransform.errors import FormatError, KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from _helpers import assert_unchanged, snapshot

E4M3 = torch.float8_e4m3fn


def _small_tree() -> fvt.ParamTree:
    g = torch.Generator().manual_seed(0)
    return fvt.ParamTree({
        "a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
        "b.weight": torch.randn(2, 4, generator=g) * 10, "norm.weight": torch.ones(4), "ids": torch.arange(3),
    })


# ---- the layout as data ---------------------------------------------------------------------------------


def test_layout_names_and_split():
    assert _fp8.scale_key("blocks.0.ffn.0.weight") == "blocks.0.ffn.0.scale_weight"
    assert _fp8.input_scale_key("proj.weight") == "proj.scale_input"
    assert _fp8.weight_key_of("proj.scale_input") == "proj.weight"
    assert _fp8.weight_key_of("proj.bias") is None
    assert _fp8.marker_prefix("model.diffusion_model.scaled_fp8") == "model.diffusion_model."
    assert _fp8.marker_prefix("scaled_fp8") == ""
    assert _fp8.marker_prefix("not_scaled_fp8") is None
    assert _fp8.marker_fp8_dtype(torch.float32) is E4M3
    assert _fp8.marker_fp8_dtype(torch.float8_e5m2) is torch.float8_e5m2
    assert _fp8.marker_fp8_dtype(torch.bfloat16) is None
    with pytest.raises(ValueError, match="'a.bias' is not a weight key"):
        _fp8.scale_key("a.bias")
    layout = _fp8.split_layout(["a.weight", "a.scale_weight", "a.scale_input", "b.scale_weight", "m.scaled_fp8", "c.weight"])
    assert layout.scales == {"a.weight": "a.scale_weight"}
    assert layout.input_scales == {"a.weight": "a.scale_input"}
    assert layout.orphans == ("b.scale_weight",)
    assert layout.markers == ("m.scaled_fp8",)
    assert layout.layout_keys == {"a.scale_weight", "a.scale_input", "b.scale_weight", "m.scaled_fp8"}
    assert not _fp8.split_layout(["a.weight"]).is_scaled


def test_amax_scale_keeps_the_largest_value_in_range():
    """Regression: float32 rounding of max|x| / (max|x| / 448) gave 448.00003, refused as an overflow."""
    for v in (3.669888496398926, 7.437829971313477, 5.140816688537598, 1e-7, 123456.0):
        x = torch.tensor([v, -v / 3])
        s = _fp8.amax_scale(x, E4M3)
        assert float((x / s).abs().max()) <= 448.0
        _fp8.quantize_tensor(x, E4M3, s)  # no Fp8Overflow


# ---- quantize_fp8 -----------------------------------------------------------------------------------------


def test_quantize_scaled_writes_the_layout_comfyui_reads():
    tree = _small_tree()
    snap = snapshot(tree)
    q = fvt.quantize_fp8(tree)
    assert_unchanged(tree, snap)
    assert list(q) == ["a.weight", "a.scale_weight", "a.bias", "b.weight", "b.scale_weight", "norm.weight", "ids", "scaled_fp8"]
    for layer in ("a", "b"):
        assert q[f"{layer}.weight"].dtype is E4M3
        s = q[f"{layer}.scale_weight"]
        assert s.dtype is torch.float32 and s.shape == ()  # ComfyUI's Parameter(torch.ones((), dtype=float32))
        assert float(s) == pytest.approx(float(tree[f"{layer}.weight"].abs().max()) / 448, rel=1e-6)
    assert q["scaled_fp8"].dtype is E4M3 and q["scaled_fp8"].numel() == 0  # its dtype names the weights' dtype
    assert q["a.bias"] is tree["a.bias"] and q["ids"] is tree["ids"]  # 1-D and integer tensors untouched
    e5 = fvt.quantize_fp8(tree, "float8_e5m2")
    assert e5["scaled_fp8"].dtype is torch.float8_e5m2 and e5["a.weight"].dtype is torch.float8_e5m2
    given = fvt.quantize_fp8(tree, scale=0.5, only="b.weight")
    assert float(given["b.scale_weight"]) == 0.5 and "a.scale_weight" not in given
    assert fvt.transforms.quantize_fp8(scale=0.5, only="b.weight")(tree) == given


def test_quantize_plain_is_a_cast_and_refuses_overflow():
    tree = fvt.ParamTree({"l.weight": torch.tensor([[1.0, -500.0], [0.3, 2.0]])})
    with pytest.raises(NumericError, match=r"'l.weight' has magnitude 500 beyond float8_e4m3fn.*saturate=True"):
        fvt.quantize_fp8(tree, layout="plain")
    clamped = fvt.quantize_fp8(tree, layout="plain", saturate=True)
    assert list(clamped) == ["l.weight"]  # no scales, no marker
    assert clamped["l.weight"].float().tolist()[0] == [1.0, -448.0]
    fits = fvt.ParamTree({"l.weight": torch.tensor([[1.0, 0.3]])})
    assert torch.equal(fvt.quantize_fp8(fits, layout="plain")["l.weight"].view(torch.uint8), fits["l.weight"].to(E4M3).view(torch.uint8))
    with pytest.raises(NumericError, match=r"'l.weight' has magnitude 1792 \(divided by scale=0.00223214\) beyond .*larger scale="):
        fvt.quantize_fp8(fvt.ParamTree({"l.weight": torch.tensor([[4.0]])}), scale=1 / 448)
    with pytest.raises(NumericError, match=r"'l.weight' holds NaN or Inf"):
        fvt.quantize_fp8(fvt.ParamTree({"l.weight": torch.tensor([[1.0, float("nan")]])}))


def test_quantize_seed_is_stochastic_and_reproducible():
    tree = fvt.ParamTree({"l.weight": torch.full((64, 64), 1.1)})  # between two e4m3 codes: 1.0 and 1.125
    a = fvt.quantize_fp8(tree, layout="plain", seed=1)["l.weight"].float()
    b = fvt.quantize_fp8(tree, layout="plain", seed=1)["l.weight"].float()
    c = fvt.quantize_fp8(tree, layout="plain", seed=2)["l.weight"].float()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {1.0, 1.125}
    assert abs(float(a.mean()) - 1.1) < 0.01  # unbiased: 4096 draws, sd of the mean 0.0008


def test_quantize_argument_errors():
    tree = _small_tree()
    with pytest.raises(UsageError, match=r"dtype 'bfloat16' is no float8 dtype"):
        fvt.quantize_fp8(tree, "bfloat16")
    with pytest.raises(UsageError, match=r"layout='blocky'"):
        fvt.quantize_fp8(tree, layout="blocky")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"scale= is for layout='scaled'"):
        fvt.quantize_fp8(tree, layout="plain", scale=0.1)
    with pytest.raises(UsageError, match=r"scale=-1; expected a positive finite number"):
        fvt.quantize_fp8(tree, scale=-1)
    with pytest.raises(UsageError, match=r"already in the scaled-fp8 layout.*fvt.dequantize"):
        fvt.quantize_fp8(fvt.quantize_fp8(tree))
    with pytest.raises(KeyMismatchError, match=r"only='nothing.\*' matched no key"):
        fvt.quantize_fp8(tree, only="nothing.*")
    with pytest.raises(UsageError, match=r"picks \['ids'\], which are int64"):
        fvt.quantize_fp8(tree, only=["ids"])
    with pytest.raises(UsageError, match=r"only '\*.weight' keys.*\['a.bias'\]"):
        fvt.quantize_fp8(tree, only="a.*")
    with pytest.raises(UsageError, match=r"fvt.transforms.quantize_fp8.*takes no tree"):
        fvt.transforms.quantize_fp8(tree)
    with pytest.raises(UsageError, match=r"layout='blocky'"):
        fvt.transforms.quantize_fp8(layout="blocky")  # type: ignore[arg-type]  # checked when the step is built


# ---- dequantize ---------------------------------------------------------------------------------------------


def test_dequantize_is_lazy_and_exact():
    tree = _small_tree()
    q = fvt.quantize_fp8(tree)
    back = fvt.dequantize(q, torch.bfloat16)
    assert list(back) == ["a.weight", "a.bias", "b.weight", "norm.weight", "ids"]  # scales and marker gone
    w = back["b.weight"]
    assert isinstance(w, _fp8.Upcast) and w.fp8 is q["b.weight"]  # the float8 tensor itself: nothing made yet
    assert w.dtype is torch.bfloat16 and w.shape == (2, 4)
    assert repr(w) == "Upcast('b.weight': scaled float8_e4m3fn [2, 4] -> bfloat16, dequantised when used)"
    want = (q["b.weight"].float() * q["b.scale_weight"]).to(torch.bfloat16)
    assert fvt.tensors_equal(w + 0, want) and fvt.tensors_equal(w.clone(), want)
    assert back["a.bias"] is tree["a.bias"]
    assert torch.allclose(w.float(), tree["b.weight"], rtol=2**-4, atol=0)  # within e4m3's relative step
    assert fvt.transforms.dequantize(torch.bfloat16)(q) == back
    assert repr(fvt.transforms.dequantize("bf16")) == "dequantize(torch.bfloat16)"
    plain = fvt.quantize_fp8(tree, layout="plain", saturate=True)
    assert fvt.tensors_equal(fvt.dequantize(plain, torch.float32)["a.weight"] + 0, plain["a.weight"].float())
    with pytest.raises(UsageError, match=r"fvt.dequantize: dtype=float8_e4m3fn is a float8 dtype.*Fix: dtype=torch.bfloat16"):
        fvt.dequantize(q, E4M3)
    with pytest.raises(UsageError, match=r"fvt.dequantize\(tree\) runs now"):
        fvt.dequantize()  # type: ignore[call-arg]


def test_a_tied_float8_weight_is_dequantised_with_each_keys_own_scale():
    q = _scaled()
    q["b2.weight"] = q["b.weight"]  # one float8 tensor under two keys, each with its own scale
    q["b2.scale_weight"] = q["b.scale_weight"] * 2
    back = fvt.dequantize(q, torch.float32)
    assert fvt.tensors_equal(back["b2.weight"] + 0, (back["b.weight"] + 0) * 2)
    q["b2.scale_weight"] = q["b.scale_weight"]
    tied = fvt.dequantize(q, torch.float32)
    assert tied["b2.weight"] is tied["b.weight"]  # same tensor and scale: one Upcast, the tie kept


def test_saved_fp8_loads_lazily_and_dequantizes_one_tensor_at_a_time(tmp_path):
    tree = _small_tree()
    q = fvt.quantize_fp8(tree)
    fvt.save(q, tmp_path / "q.safetensors")
    loaded = fvt.load(tmp_path / "q.safetensors")
    assert loaded == q and loaded["a.weight"].dtype is E4M3 and loaded["scaled_fp8"].dtype is E4M3
    header = json.loads((tmp_path / "q.safetensors").read_bytes()[8:8 + int.from_bytes((tmp_path / "q.safetensors").read_bytes()[:8], "little")])
    assert header["a.weight"]["dtype"] == "F8_E4M3" and header["a.scale_weight"] == {**header["a.scale_weight"], "dtype": "F32", "shape": []}
    back = fvt.dequantize(loaded, torch.bfloat16)
    assert back["a.weight"].fp8 is loaded["a.weight"]  # the mapped file's tensor: nothing read or copied yet
    fvt.save(back, tmp_path / "bf16.safetensors")  # written one tensor at a time
    eager = fvt.map_tensors(fvt.dequantize(q, torch.bfloat16), lambda t: t + 0)
    assert fvt.load(tmp_path / "bf16.safetensors") == eager


# ---- errors of a broken layout --------------------------------------------------------------------------------


def _scaled() -> dict[str, torch.Tensor]:
    return dict(fvt.quantize_fp8(_small_tree()))


@pytest.mark.parametrize("edit, error, match", [
    ({"a.scale_weight": torch.ones(4)}, ShapeMismatchError, r"scale 'a.scale_weight' of 'a.weight' is float32 of shape \[4\]; expected .*shape \[\] or \[1\]"),
    ({"a.scale_weight": torch.ones((), dtype=torch.int32)}, ShapeMismatchError, r"'a.scale_weight' of 'a.weight' is int32"),
    ({"a.scale_weight": torch.tensor(float("nan"))}, NumericError, r"scale 'a.scale_weight' of 'a.weight' is nan; expected a finite"),
    ({"a.scale_weight": torch.tensor([float("inf")])}, NumericError, r"'a.scale_weight' .* is inf"),
    ({"c.scale_weight": torch.ones(())}, KeyMismatchError, r"without their weight: \['c.scale_weight'\]; expected 'c.weight'"),
    ({"c.scale_input": torch.ones(())}, KeyMismatchError, r"without their weight: \['c.scale_input'\]"),
    ({"scaled_fp8": torch.empty(0, dtype=torch.bfloat16)}, FormatError, r"marker 'scaled_fp8' has dtype bfloat16, which names no float8"),
    ({"norm.scale_weight": torch.ones(())}, ShapeMismatchError, r"'norm.weight' has the scale 'norm.scale_weight' but is float32"),
])
def test_broken_layouts_are_refused(edit, error, match):
    tree = {**_scaled(), **edit}
    with pytest.raises(error, match=match):
        fvt.dequantize(tree)


def test_a_weight_without_its_scale_under_the_marker():
    tree = _scaled()
    del tree["b.scale_weight"]
    with pytest.raises(KeyMismatchError, match=r"marker 'scaled_fp8' says .* 1 have no scale: \['b.weight'\] .*'b.scale_weight'"):
        fvt.dequantize(tree)
    del tree["scaled_fp8"]  # without the marker it is a plain float8 weight
    assert fvt.tensors_equal(fvt.dequantize(tree)["b.weight"] + 0, tree["b.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("dtype, code", [(E4M3, 0x7F), (torch.float8_e5m2, 0x7C), (torch.float8_e5m2, 0x7E)])
def test_nan_or_inf_in_a_float8_weight_raises_when_used(dtype, code):
    w = torch.zeros(2, 2, dtype=torch.uint8)
    w[1, 1] = code
    tree = fvt.ParamTree({"l.weight": w.view(dtype)})
    lazy = fvt.dequantize(tree)  # nothing is read yet
    with pytest.raises(NumericError, match=r"float8 tensor 'l.weight' holds 1 NaN/Inf"):
        lazy["l.weight"] + 0
    assert _fp8.nonfinite_count(torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2)) == 1


# ---- running float8 trees -------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
from _wan_pipeline import TRANSFORMER  # noqa: E402


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    model.to(torch.bfloat16)
    return model, fvt.ParamTree.from_module(model)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 1, 4, 4, generator=g).bfloat16(), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 3, 16, generator=g).bfloat16(), return_dict=False)


def _eager(q):
    """The dequantised tree made whole, as plain tensors (what a dequantise-then-run user would hold)."""
    return fvt.map_tensors(fvt.dequantize(q, torch.bfloat16), lambda t: t + 0)


@pytest.mark.parametrize("layout", ["scaled", "plain"])
def test_call_on_a_lazily_loaded_fp8_tree_equals_the_dequantized_forward(wan, layout, tmp_path):
    model, tree = wan
    q = fvt.quantize_fp8(tree, layout=layout, saturate=True)
    fvt.save(q, tmp_path / "q.safetensors")
    loaded = fvt.load(tmp_path / "q.safetensors")
    with torch.no_grad():
        got = fvt.call(model, loaded, **_inputs(), compute_dtype=torch.bfloat16)[0]
        default = fvt.call(model, loaded, **_inputs())[0]  # compute dtype: the module's own (bfloat16)
        want = fvt.call(model, _eager(q), **_inputs())[0]
        full = fvt.call(model, tree, **_inputs())[0]
    assert fvt.tensors_equal(got, want) and fvt.tensors_equal(default, want)
    assert torch.allclose(got.float(), full.float(), atol=0.1) and not torch.equal(got, full)


def test_lora_call_over_an_fp8_base(wan):
    model, tree = wan
    q = fvt.quantize_fp8(tree)
    adapter = fvt.lora.random_adapter(tree, targets="blocks.*.attn1.to_q.weight", rank=2, seed=3)
    with torch.no_grad():
        got = fvt.lora.call(model, q, adapter, **_inputs(), compute_dtype="bfloat16")[0]
        want = fvt.lora.call(model, _eager(q), adapter, **_inputs())[0]
        base = fvt.call(model, q, **_inputs())[0]
    assert fvt.tensors_equal(got, want) and not torch.equal(got, base)


def test_call_upcasts_one_weight_at_a_time(wan, monkeypatch):
    """Never a full-precision copy of the model: each dequantised weight is dropped after its operation."""
    model, tree = wan
    q = fvt.quantize_fp8(tree)
    made: list[weakref.ref[torch.Tensor]] = []
    most = [0]
    real = _fp8.dequantize_tensor

    def counting(w, scale, dtype):
        out = real(w, scale, dtype)
        most[0] = max(most[0], sum(r() is not None for r in made) + 1)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(_fp8, "dequantize_tensor", counting)
    with torch.no_grad():
        fvt.call(model, q, **_inputs())
    assert len(made) >= 26  # every scaled weight was used
    assert most[0] <= 2, most[0]


def test_strict_keys_still_hold_for_fp8_trees(wan):
    model, tree = wan
    q = fvt.quantize_fp8(tree)
    with pytest.raises(KeyMismatchError, match=r"unexpected \(1\): \['stray'\]"):
        fvt.call(model, {**q, "stray": torch.zeros(1)}, **_inputs())
    missing = dict(q)
    del missing["proj_out.weight"], missing["proj_out.scale_weight"]
    with pytest.raises(KeyMismatchError, match=r"missing \(1\): \['proj_out.weight'\]"):
        fvt.call(model, missing, **_inputs())
    with pytest.raises(UsageError, match=r"fvt.call: compute_dtype=float8_e4m3fn is a float8 dtype.*Fix: compute_dtype=torch.bfloat16"):
        fvt.call(model, q, **_inputs(), compute_dtype=E4M3)


def test_plain_layout_matches_diffusers_layerwise_casting(wan):
    """diffusers stores the layers it casts (weights and biases) in float8 and upcasts each as it runs."""
    model, tree = wan
    ref = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    ref.load_state_dict(model.state_dict())
    ref.to(torch.bfloat16)
    ref.enable_layerwise_casting(storage_dtype=E4M3, compute_dtype=torch.bfloat16)
    stored = {k: v for k, v in ref.state_dict().items() if v.dtype is E4M3}
    assert any(k.endswith(".bias") for k in stored) and len(stored) < len(tree)
    q = fvt.quantize_fp8(tree, layout="plain", only=list(stored))
    assert all(fvt.tensors_equal(q[k], v) for k, v in stored.items())  # the same float8 bytes
    with torch.no_grad():
        got = fvt.call(model, q, **_inputs(), compute_dtype=torch.bfloat16)[0]
        want = ref(**_inputs())[0]
    assert fvt.tensors_equal(got, want)


def test_a_file_written_by_comfyui_rules_reads_back(tmp_path):
    """A full checkpoint as ComfyUI's readers take it: prefixed keys, a float32 marker (= e4m3fn), [1] scales,
    a scale_input of 1.0 (ignored), unscaled float8 tensors outside the linear layers."""
    p = "model.diffusion_model."
    w = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(E4M3)
    tree = fvt.ParamTree({
        f"{p}blocks.0.q.weight": w, f"{p}blocks.0.q.scale_weight": torch.tensor([0.25]),
        f"{p}blocks.0.q.scale_input": torch.tensor([1.0]), f"{p}blocks.0.q.bias": torch.zeros(2, dtype=torch.bfloat16),
        f"{p}patch.weight": torch.ones(2, 1, 1, 1, 1, dtype=E4M3), f"{p}scaled_fp8": torch.empty(0, dtype=torch.float32),
    })
    fvt.save(tree, tmp_path / "comfy.safetensors")
    back = fvt.dequantize(fvt.load(tmp_path / "comfy.safetensors"), torch.float32)
    assert sorted(back) == [f"{p}blocks.0.q.bias", f"{p}blocks.0.q.weight", f"{p}patch.weight"]
    assert (back[f"{p}blocks.0.q.weight"] + 0).tolist() == [[0.25, -0.5], [0.125, 112.0]]
    ours = fvt.quantize_fp8(fvt.ParamTree({"blocks.0.q.weight": torch.randn(3, 2)}))
    for k, v in ours.items():  # every scale beside an fp8 weight of its layer; the marker's dtype names it
        if k.endswith(".scale_weight"):
            assert ours[k[: -len("scale_weight")] + "weight"].dtype is E4M3 and v.dtype is torch.float32 and v.dim() == 0
    assert _fp8.marker_fp8_dtype(ours["scaled_fp8"].dtype) is E4M3


def test_inspect_describes_the_fp8_layout(tmp_path, capsys):
    from fvtransform.cli import main

    fvt.save(fvt.quantize_fp8(_small_tree()), tmp_path / "q.safetensors")
    assert main(["--json", "inspect", str(tmp_path / "q.safetensors")]) == 0
    fp8 = json.loads(capsys.readouterr().out)["fp8"]
    assert fp8 == {"weights": 2, "scaled": 2, "plain": 0, "scale_input": 0, "markers": {"scaled_fp8": "float8_e4m3fn"},
                   "orphan_scales": [], "damaged_scales": {}, "dtypes": {"float8_e4m3fn": 2}}
    assert main(["inspect", str(tmp_path / "q.safetensors")]) == 0
    assert "float8: 2 weights (2 scaled, 0 plain; float8_e4m3fn: 2), marker 'scaled_fp8' (float8_e4m3fn)" in capsys.readouterr().out
    fvt.save(_small_tree(), tmp_path / "f32.safetensors")
    assert main(["--json", "inspect", str(tmp_path / "f32.safetensors")]) == 0
    assert "fp8" not in json.loads(capsys.readouterr().out)  # nothing float8: no section


@pytest.mark.parametrize("dtype", [E4M3, torch.float8_e5m2])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32])
def test_the_fast_dequantisation_gives_the_elementwise_bits(dtype, target, monkeypatch):
    """Large CPU tensors are dequantised in chunks through float16 bits: every pair of codes, scaled or not,
    gives the elementwise bits (NaN codes a NaN), across a chunk boundary too."""
    lo = torch.arange(256, dtype=torch.int32).repeat(256)
    hi = torch.arange(256, dtype=torch.int32).repeat_interleave(256)
    codes = torch.stack([lo, hi], dim=1).to(torch.uint8).view(dtype).reshape(-1, 8)  # every (lo, hi) pair
    assert codes.numel() >= _fp8._FAST_FROM
    for scale in (None, torch.tensor(0.0123), torch.tensor([3.5])):
        got = _fp8.dequantize_tensor(codes, scale, target)
        monkeypatch.setattr(_fp8, "_CHUNK", 4096 + 8)  # chunks end mid-tensor, odd sizes
        assert fvt.tensors_equal(_fp8.dequantize_tensor(codes, scale, target), got)
        monkeypatch.undo()
        want = codes.float() if scale is None else codes.float() * scale.float()
        want = want.to(target)
        nan = want.isnan()
        assert got.shape == codes.shape and bool(got.isnan().eq(nan).all())  # NaN codes: a NaN (payload may differ)
        assert fvt.tensors_equal(got[~nan], want[~nan])


def test_cast_refuses_to_drop_the_scales():
    """Regression: fvt.cast of a scaled tree cast the float8 weights without their scale (every value off by it)."""
    q = fvt.quantize_fp8(_small_tree())
    with pytest.raises(UsageError, match=r"fvt.cast\(tree, bfloat16\) would cast scaled float8 weights .*\['a.weight', 'b.weight'\].*fvt.dequantize\(tree, 'bfloat16'\)"):
        fvt.cast(q, torch.bfloat16)
    with pytest.raises(UsageError, match=r"\['b.weight'\]"):
        fvt.transforms.cast("float16", only="b.*")(q)
    assert fvt.cast(q, torch.bfloat16, only="norm.*")["norm.weight"].dtype is torch.bfloat16  # no scaled weight picked
    plain = fvt.quantize_fp8(_small_tree(), layout="plain", saturate=True)
    assert fvt.cast(plain, torch.float32)["b.weight"].dtype is torch.float32  # a plain float8 cast is exact


@pytest.mark.parametrize("dtype", [E4M3, torch.float8_e5m2])
def test_dequantize_into_gives_the_elementwise_bits_for_every_code(dtype):
    """The float16-bit path of the merge's dequantisation: every code, scaled or not (odd, tiny and huge scales),
    gives the bits of dequantize_tensor; NaN codes give NaN."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(16, 16)
    for scale in (None, torch.tensor(0.0123), torch.tensor([3.5]), torch.tensor(1e-40), torch.tensor(3e38)):
        out = torch.empty(16, 16)
        _fp8.dequantize_into(codes, scale, out, torch.empty(256, dtype=torch.int16))
        want = _fp8.dequantize_tensor(codes, scale, torch.float32)
        nan = want.isnan()
        assert bool(out.isnan().eq(nan).all())
        assert fvt.tensors_equal(out[~nan], want[~nan])


@pytest.mark.parametrize("dtype", [E4M3, torch.float8_e5m2])
def test_quantize_into_a_buffer_is_torchs_cast_and_checks_the_range(dtype):
    """quantize_tensor(out=, overwrite=): the bits of torch's cast; the range check (one aminmax) still refuses
    NaN and values beyond the float8 maximum, before the buffer is touched."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=g) * (_fp8.fp8_max(dtype) / 5)
    out = torch.empty(64, 64, dtype=dtype)
    got = _fp8.quantize_tensor(x.clone(), dtype, out=out, overwrite=True)
    assert got is out and fvt.tensors_equal(out.view(torch.uint8), x.to(dtype).view(torch.uint8))
    bad = x.clone()
    bad[3, 4] = -2 * _fp8.fp8_max(dtype)
    with pytest.raises(_fp8.Fp8Overflow, match="largest magnitude"):
        _fp8.quantize_tensor(bad, dtype, out=out, overwrite=True)
    assert float(bad[3, 4]) == -2 * _fp8.fp8_max(dtype)
    bad[3, 4] = float("nan")
    with pytest.raises(_fp8.Fp8Overflow, match="nan"):
        _fp8.quantize_tensor(bad, dtype)


@pytest.mark.parametrize("dtype", [E4M3, torch.float8_e5m2])
def test_stochastic_rounding_picks_a_neighbour_with_the_right_frequency(dtype):
    """The bit-pattern stochastic rounding: exact float8 values stay, every result is one of the two neighbours
    (subnormals, the binade edges and the maximum included), and the share rounded up is the distance."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    lo, hi = grid[:-1], grid[1:]
    g = torch.Generator().manual_seed(0)
    assert fvt.tensors_equal(_fp8.quantize_tensor(grid, dtype, generator=g).float(), grid)
    assert fvt.tensors_equal(_fp8.quantize_tensor(-grid, dtype, generator=g).float(), -grid)
    frac = torch.tensor([0.25, 0.5, 0.875])
    x = (lo[:, None] + (hi - lo)[:, None] * frac).repeat(1, 2000)  # [gaps, 3 * 2000]
    for sign in (1.0, -1.0):
        q = _fp8.quantize_tensor(sign * x, dtype, generator=g).float() * sign
        assert bool(((q == lo[:, None]) | (q == hi[:, None])).all())
        share = (q == hi[:, None]).float().reshape(len(lo), 2000, 3).mean(dim=1)
        assert float((share - frac).abs().max()) < 0.06  # 2000 draws: 5 standard errors of a share near 0.5


@pytest.mark.parametrize("call", ["call", "lora.call"])
def test_compute_dtype_is_checked_whatever_the_tree_holds(call):
    lin = torch.nn.Linear(2, 2)
    tree = fvt.ParamTree(dict(lin.named_parameters()))  # float32, no float8: compute_dtype has nothing to upcast
    run = fvt.call if call == "call" else (lambda m, t, *a, **k: fvt.lora.call(m, t, [], *a, **k))
    assert run(lin, tree, torch.ones(1, 2), compute_dtype="bf16").dtype == torch.float32  # float8 weights only
    with pytest.raises(UsageError, match=rf"fvt.{call}: compute_dtype 'nonsense': expected a floating torch.dtype"):
        run(lin, tree, torch.ones(1, 2), compute_dtype="nonsense")
    with pytest.raises(UsageError, match=rf"fvt.{call}: compute_dtype=float8_e4m3fn is a float8 dtype"):
        run(lin, tree, torch.ones(1, 2), compute_dtype=E4M3)
