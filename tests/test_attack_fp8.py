"""Black-box attacks on the float8 support (issue 17). Each test FAILS on the code it was written against and
states the expected behaviour; the one-line comment says what is wrong. Data is made in tmp_path."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import (
    FormatError,
    FvTransformError,
    KeyMismatchError,
    NumericError,
    ShapeMismatchError,
    UsageError,
)

E4 = torch.float8_e4m3fn


def _raw(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> Path:
    """A safetensors file written by hand: header JSON + bytes, no library involved."""
    header: dict[str, object] = {}
    data = b""
    for name, dt, shape, raw in entries:
        header[name] = {
            "dtype": dt,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _f32(v: float) -> bytes:
    return torch.tensor(v, dtype=torch.float32).numpy().tobytes()


def _w8(values: list[list[float]]) -> bytes:
    return torch.tensor(values).to(E4).view(torch.uint8).numpy().tobytes()


def _scaled_file(
    path: Path, scale: float, weight: bytes | None = None, marker_dt: str = "F8_E4M3"
) -> Path:
    weight = weight if weight is not None else _w8([[1.0, -2.0], [0.5, 3.0]])
    return _raw(
        path,
        [
            ("l.weight", "F8_E4M3", [2, 2], weight),
            ("l.scale_weight", "F32", [], _f32(scale)),
            ("scaled_fp8", marker_dt, [0], b""),
        ],
    )


def _adapter(shape: tuple[int, int], key: str = "l.weight") -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(
        fvt.ParamTree({key: torch.zeros(*shape)}), targets=key, rank=1, seed=0
    )


# --- 1. silent overflow on dequantize -------------------------------------------------------------------------


def test_dequantize_to_float16_overflow_is_refused(tmp_path: Path) -> None:
    # WRONG: 448 * scale 1000 = 448000 > float16 max; dequantize(…, float16) silently gives inf
    path = _raw(
        tmp_path / "big.safetensors",
        [
            ("l.weight", "F8_E4M3", [1, 2], _w8([[448.0, 1.0]])),
            ("l.scale_weight", "F32", [], _f32(1000.0)),
            ("scaled_fp8", "F8_E4M3", [0], b""),
        ],
    )
    tree = fvt.dequantize(fvt.load(path), torch.float16)
    with pytest.raises(NumericError, match="l.weight"):
        tree["l.weight"] + 0


def test_call_in_float16_overflow_is_refused() -> None:
    # WRONG: fvt.call over a scaled tree whose weight * scale exceeds float16 (448 * 1000) returns inf, silently
    lin = torch.nn.Linear(2, 2).half()
    tree = fvt.ParamTree(
        {
            "weight": torch.tensor([[448.0, 1.0], [1.0, 1.0]]).to(E4),
            "bias": torch.zeros(2).half(),
            "scale_weight": torch.tensor(1000.0),
            "scaled_fp8": torch.empty(0, dtype=E4),
        }
    )
    with pytest.raises(NumericError, match="weight"):
        fvt.call(lin, tree, torch.ones(1, 2).half(), compute_dtype=torch.float16)


# --- 2. zero / negative scales: merge refuses them as damaged, load/dequantize/call use them silently -----------


def test_dequantize_zero_scale_is_refused(tmp_path: Path) -> None:
    # WRONG: a 0.0 scale_weight loads and dequantises to an all-zero weight, silently (merge calls it damaged)
    path = _scaled_file(tmp_path / "zero.safetensors", 0.0)
    with pytest.raises(NumericError, match=r"zero\.safetensors.*l\.scale_weight"):
        fvt.dequantize(fvt.load(path), torch.float32)["l.weight"] + 0


def test_dequantize_negative_scale_is_refused(tmp_path: Path) -> None:
    # WRONG: a negative scale_weight loads and dequantises to the sign-flipped weight, silently
    path = _scaled_file(tmp_path / "neg.safetensors", -2.0)
    with pytest.raises(NumericError, match=r"neg\.safetensors.*l\.scale_weight"):
        fvt.dequantize(fvt.load(path), torch.float32)["l.weight"] + 0


def test_call_over_zero_scale_tree_is_refused() -> None:
    # WRONG: fvt.call over a scaled tree whose scale is 0 runs a zero weight and returns the bias, silently
    lin = torch.nn.Linear(2, 2)
    tree = fvt.ParamTree(
        {
            "weight": torch.ones(2, 2).to(E4),
            "bias": torch.zeros(2),
            "scale_weight": torch.tensor(0.0),
            "scaled_fp8": torch.empty(0, dtype=E4),
        }
    )
    with pytest.raises(NumericError, match="scale_weight"):
        fvt.call(lin, tree, torch.ones(1, 2), compute_dtype=torch.float32)


# --- 3. marker dtype disagrees with the weights ----------------------------------------------------------------


def test_marker_dtype_disagreeing_with_weights_is_refused(tmp_path: Path) -> None:
    # WRONG: marker says float8_e5m2, weights are float8_e4m3fn: accepted silently (ComfyUI would load the weights
    # as e5m2, re-rounding them); the layout is broken and should be refused naming the marker and both dtypes
    path = _scaled_file(tmp_path / "mix.safetensors", 2.0, marker_dt="F8_E5M2")
    with pytest.raises(
        FormatError, match=r"mix\.safetensors.*scaled_fp8.*float8_e5m2.*float8_e4m3fn"
    ):
        fvt.dequantize(fvt.load(path), torch.float32)["l.weight"] + 0


# --- 4. error messages: file not named, a fix that does not exist, the wrong diagnosis ------------------------------


def test_fp8_nan_error_names_the_file(tmp_path: Path) -> None:
    # WRONG: the NaN error of a loaded float8 tensor says "tree: float8 tensor 'l.weight' ...", not the file
    path = _raw(
        tmp_path / "nanbits.safetensors",
        [("l.weight", "F8_E4M3", [2, 2], bytes([0x7F, 0x38, 0x38, 0x38]))],
    )
    with pytest.raises(NumericError, match=r"nanbits\.safetensors"):
        fvt.dequantize(fvt.load(path), torch.float32)["l.weight"] + 0


def test_merge_nan_error_names_an_existing_fix() -> None:
    # WRONG: the message says "Check them with fvt.inspect", and fvt.inspect does not exist (AttributeError)
    base = fvt.ParamTree(
        {
            "l.weight": torch.tensor(
                [[0x7F, 0x38], [0x38, 0x38]], dtype=torch.uint8
            ).view(E4)
        }
    )
    with pytest.raises(NumericError) as info:
        fvt.lora.merge(base, _adapter((2, 2)), 0.5)
    msg = str(info.value)
    assert "fvt.inspect" not in msg or hasattr(fvt, "inspect"), msg


def test_merge_tiny_scale_reports_overflow_not_nan() -> None:
    # WRONG: a finite base (scale 1e-45, what quantize_fp8 itself writes for weights ~1e-44) and a finite LoRA give
    # "the merged weight holds NaN/Inf ... the base or the adapter holds NaN/Inf"; it is an overflow of the fp8 range
    # after dividing by the scale, which the docs say is reported with the largest value and the recompute fix
    base = fvt.quantize_fp8(fvt.ParamTree({"l.weight": torch.full((2, 2), 1e-44)}))
    with pytest.raises(NumericError, match=r"(?s)overflow.*recompute"):
        fvt.lora.merge(base, _adapter((2, 2)), 1.0)


def test_quantize_tiny_given_scale_is_not_called_nan() -> None:
    # WRONG: quantize_fp8(scale=1e-45) of finite weights says "'l.weight' holds NaN or Inf"; the scale overflows it
    with pytest.raises(
        NumericError, match=r"beyond float8_e4m3fn's largest finite value"
    ):
        fvt.quantize_fp8(
            fvt.ParamTree({"l.weight": torch.tensor([[1.0, -2.0]])}), scale=1e-45
        )


# --- 5. a scale beside a non-float8 weight: dequantize refuses it, merge ignores the scale -------------------------


def test_merge_refuses_scale_beside_bf16_weight() -> None:
    # WRONG: dequantize refuses 'l.weight' (bf16) + 'l.scale_weight' under the marker; merge silently adds the LoRA
    # to the unscaled bf16 weight and keeps the scale (a reader multiplies by 2 afterwards: the LoRA is doubled)
    tree = fvt.ParamTree(
        {
            "l.weight": torch.tensor([[1.0, -2.0], [0.5, 3.0]]).bfloat16(),
            "l.scale_weight": torch.tensor(2.0),
            "scaled_fp8": torch.empty(0, dtype=E4),
        }
    )
    with pytest.raises(ShapeMismatchError, match="l.scale_weight"):
        fvt.lora.merge(tree, _adapter((2, 2)), 1.0)


# --- 6. raw NotImplementedError -----------------------------------------------------------------------------------


def test_dequantize_fnuz_is_a_typed_error() -> None:
    # WRONG: dequantize of a float8_e4m3fnuz tensor raises torch's raw NotImplementedError ("add_stub")
    tree = fvt.ParamTree(
        {"l.weight": torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fnuz)}
    )
    with pytest.raises(FvTransformError, match="l.weight"):
        fvt.dequantize(tree, torch.float32)["l.weight"] + 0


def test_merge_into_fnuz_is_refused() -> None:
    # WRONG: merge into a float8_e4m3fnuz weight (no supported float8 dtype, quantize_fp8 refuses it) is accepted
    tree = fvt.ParamTree(
        {"l.weight": torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fnuz)}
    )
    with pytest.raises(FvTransformError, match="float8_e4m3fnuz"):
        fvt.lora.merge(tree, _adapter((1, 2)), 1.0)


# --- 7. quantize_fp8 that quantises nothing ------------------------------------------------------------------------


def test_quantize_root_weight_of_a_linear() -> None:
    # WRONG: the tree of a bare nn.Linear ('weight') comes back float32 with a 'scaled_fp8' marker: nothing quantised,
    # a marker that claims the layout, no error
    q = fvt.quantize_fp8(fvt.ParamTree.from_module(torch.nn.Linear(4, 4)))
    assert q["weight"].dtype == E4 and "scale_weight" in q


def test_quantize_with_nothing_to_quantise_is_refused() -> None:
    # WRONG: a tree with no 2-D weight gets a marker and nothing else (only= matching nothing is a KeyMismatchError)
    with pytest.raises(KeyMismatchError):
        fvt.quantize_fp8(fvt.ParamTree({"l.bias": torch.zeros(2)}))


# --- 8. inspect of a hostile file -----------------------------------------------------------------------------------


def _cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cwd: Path,
    *args: str,
) -> tuple[int, str]:
    """`python -m fvtransform ARGS` in this process (a subprocess costs seconds of import)."""
    import runpy

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fvtransform", *args])
    code = 0
    try:
        runpy.run_module("fvtransform", run_name="__main__", alter_sys=False)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def test_inspect_flags_a_nan_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # WRONG: `fvtransform inspect` of a file whose scale_weight is NaN (fvt.load refuses it) reports
    # "1 scaled" with rc 0 and no word of the broken scale
    _scaled_file(tmp_path / "nanscale.safetensors", float("nan"))
    code, out = _cli(monkeypatch, capsys, tmp_path, "inspect", "nanscale.safetensors")
    assert code != 0 or "nan" in out.lower(), out


# --- 9. the marker of a prefixed (full) checkpoint ------------------------------------------------------------------


def test_quantize_prefixed_tree_writes_the_prefixed_marker() -> None:
    # WRONG: quantising a full checkpoint's tree ('model.diffusion_model.*') writes the marker as top-level
    # 'scaled_fp8'; ComfyUI looks for '{prefix}scaled_fp8' (and filters keys by the prefix), so it never sees it and
    # runs the weights without their scales. The docs name 'model.diffusion_model.scaled_fp8' for a full checkpoint
    prefix = "model.diffusion_model."
    q = fvt.quantize_fp8(
        fvt.ParamTree(
            {
                prefix + "l.weight": torch.tensor([[1.0, -2.0]]),
                prefix + "l.bias": torch.zeros(1),
            }
        )
    )
    assert sorted(q) == [
        prefix + k for k in ["l.bias", "l.scale_weight", "l.weight", "scaled_fp8"]
    ]


def test_float32_marker_with_e5m2_weights_is_refused() -> None:
    # WRONG: a float32 marker means float8_e4m3fn (the docs say so), yet float8_e5m2 weights under it are accepted
    tree = fvt.ParamTree(
        {
            "l.weight": torch.tensor([[1.0, -2.0]]).to(torch.float8_e5m2),
            "l.scale_weight": torch.tensor(2.0),
            "scaled_fp8": torch.empty(0, dtype=torch.float32),
        }
    )
    with pytest.raises(FormatError, match=r"scaled_fp8.*float8_e4m3fn.*float8_e5m2"):
        fvt.dequantize(tree, torch.float32)["l.weight"] + 0


# --- 10. quantize_fp8 argument checks ---------------------------------------------------------------------------------


def test_quantize_scale_beyond_float32_is_refused() -> None:
    # WRONG: scale=1e39 is "a positive finite number" as a Python float, but it is written as a float32 inf
    # scale_weight (weights all 0): a tree its own reader then refuses as damaged
    with pytest.raises(UsageError, match="scale"):
        fvt.quantize_fp8(
            fvt.ParamTree({"l.weight": torch.tensor([[1.0, -2.0]])}), scale=1e39
        )


@pytest.mark.parametrize("seed", [-3, True, 1.0])
def test_quantize_bad_seed_is_refused(seed: object) -> None:
    # WRONG: merge refuses seed=-1 / True / 1.5 ("expected a nonnegative int"); quantize_fp8 accepts -3, True (as 1), 1.0
    with pytest.raises(UsageError, match="seed"):
        fvt.quantize_fp8(
            fvt.ParamTree({"l.weight": torch.tensor([[1.0, -2.0]])}), seed=seed
        )  # type: ignore[arg-type]


def test_quantize_huge_seed_is_not_a_raw_valueerror() -> None:
    # WRONG: quantize_fp8(seed=2**70) raises torch's raw ValueError "Overflow when unpacking long long"
    # (merge accepts the same seed)
    try:
        fvt.quantize_fp8(
            fvt.ParamTree({"l.weight": torch.tensor([[1.0, -2.0]])}), seed=2**70
        )
    except FvTransformError:
        pass


def test_quantize_factory_checks_seed_when_built() -> None:
    # WRONG: the docs say the factory's arguments are checked when the step is built; seed=-3 builds fine
    with pytest.raises(UsageError, match="seed"):
        fvt.transforms.quantize_fp8(seed=-3)


# --- 11. LoRA against a full (prefixed) float8 checkpoint (not float8-specific: bf16 fails the same way) ---------------


def _full_fp8_checkpoint() -> fvt.ParamTree:
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    q = fvt.quantize_fp8(
        fvt.ParamTree(
            {"blocks.0.ffn.0.weight": w, "blocks.0.ffn.0.bias": torch.zeros(16)}
        )
    )
    return fvt.ParamTree({"model.diffusion_model." + k: v for k, v in q.items()})


def test_comfy_lora_resolves_against_full_fp8_checkpoint(tmp_path: Path) -> None:
    # WRONG: a ComfyUI LoRA ('diffusion_model.blocks.0.ffn.0.lora_A.weight') against a full checkpoint
    # ('model.diffusion_model.blocks.0.ffn.0.weight' + its scale + 'model.diffusion_model.scaled_fp8', the layout the
    # float8 guide names) is "no base module matches"; ComfyUI applies it to exactly that weight
    base = _full_fp8_checkpoint()
    plain = fvt.ParamTree({"blocks.0.ffn.0.weight": torch.zeros(16, 16)})
    fvt.lora.save(
        fvt.lora.random_adapter(plain, targets="blocks.*.weight", rank=2, seed=1),
        tmp_path / "l.safetensors",
        format="comfy",
    )
    adapter = fvt.lora.load(tmp_path / "l.safetensors", base=base)
    assert list(adapter) == ["model.diffusion_model.blocks.0.ffn.0.weight"]


def test_lora_load_base_as_path_is_a_typed_error(tmp_path: Path) -> None:
    # WRONG: base="checkpoint.safetensors" (a path, as the CLI's --base takes) raises a raw AttributeError
    # ("'str' object has no attribute 'items'"); expected a typed error (or the path loaded)
    fvt.save(
        fvt.ParamTree({"blocks.0.ffn.0.weight": torch.zeros(16, 16)}),
        tmp_path / "b.safetensors",
    )
    plain = fvt.ParamTree({"blocks.0.ffn.0.weight": torch.zeros(16, 16)})
    fvt.lora.save(
        fvt.lora.random_adapter(plain, targets="blocks.*.weight", rank=2, seed=1),
        tmp_path / "l.safetensors",
        format="comfy",
    )
    try:
        fvt.lora.load(tmp_path / "l.safetensors", base=str(tmp_path / "b.safetensors"))  # type: ignore[arg-type]
    except FvTransformError:
        pass
