"""LoRA merges into float8 checkpoints (issue 17, item 3 and the merge errors of item 4).

A Wan-shaped tiny model (the original Wan key names, as ComfyUI's scaled-fp8 files use them) quantised to
float8_e4m3fn in both layouts — plain, and scaled (``<module>.scale_weight`` float32 beside each weight and the
``scaled_fp8`` marker) — merged in memory, restored, and streamed disk to disk by ``merge_checkpoint`` and the CLI.

The oracle of the arithmetic is ComfyUI's patching of float8 weights (comfyanonymous/ComfyUI):
``comfy/model_patcher.py`` ``ModelPatcher.patch_weight_to_device`` (the weight copied to a float32 temp,
``convert_func`` = ``comfy/ops.py`` scaled_fp8 ``convert_weight``: ``weight * scale_weight``; the LoRA added in
float32 by ``comfy/lora.py`` ``calculate_weight``; ``set_func`` = ``set_weight``: ``stochastic_rounding(weight /
scale_weight, fp8 dtype, seed=string_to_seed(key))`` from ``comfy/float.py``). ComfyUI always rounds float8
stochastically with its own draws; the golden fixture (tests/fixtures/fp8_merge/, README there) is its result
and our nearest merge must pick, for every element, one of the two float8 neighbours ComfyUI chose between.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fvtransform as fvt
from fvtransform._fp8 import amax_scale, dequantize_tensor, quantize_tensor, scale_key
from fvtransform.errors import FormatError, NumericError, ShapeMismatchError, UsageError

from _fp8_oracle import fp8_grid, fp8_neighbours, merged_f64

E4 = torch.float8_e4m3fn
FIXTURES = Path(__file__).parent / "fixtures" / "fp8_merge"


def wan_tree(blocks: int = 2, dim: int = 32, ffn: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights with Wan2.1's key names and shape pattern (tiny widths)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.05

    t: dict[str, torch.Tensor] = {"patch_embedding.weight": r(dim, 4, 1, 2, 2), "patch_embedding.bias": r(dim),
                                  "text_embedding.0.weight": r(dim, 16), "text_embedding.0.bias": r(dim),
                                  "time_projection.1.weight": r(6 * dim, dim), "head.head.weight": r(16, dim),
                                  "head.modulation": r(1, 2, dim)}
    for b in range(blocks):
        p = f"blocks.{b}."
        for attn in ("self_attn", "cross_attn"):
            for m in ("q", "k", "v", "o"):
                t[f"{p}{attn}.{m}.weight"], t[f"{p}{attn}.{m}.bias"] = r(dim, dim), r(dim)
            t[f"{p}{attn}.norm_q.weight"] = 1 + r(dim)
        t[f"{p}ffn.0.weight"], t[f"{p}ffn.0.bias"] = r(ffn, dim), r(ffn)
        t[f"{p}ffn.2.weight"], t[f"{p}ffn.2.bias"] = r(dim, ffn), r(dim)
        t[f"{p}modulation"] = r(1, 6, dim)
    return t


def is_linear(key: str, w: torch.Tensor) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and w.dim() == 2


def fp8_tree(source: dict[str, torch.Tensor], *, scaled: bool, dtype: torch.dtype = E4, headroom: float = 4.0) -> fvt.ParamTree:
    """The linear weights of the blocks in float8 (others kept), as ComfyUI's files hold them; a scaled weight's
    largest value sits at ``max / headroom`` (1: the tight amax scale, where any growth of the largest value overflows)."""
    out: dict[str, torch.Tensor] = {}
    for k, w in source.items():
        if not is_linear(k, w):
            out[k] = w
        elif scaled:
            s = amax_scale(w, dtype) * headroom
            out[k], out[scale_key(k)] = quantize_tensor(w, dtype, s, saturate=True), s  # amax/s may round above 448 by an ulp
        else:
            out[k] = quantize_tensor(w, dtype)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=dtype)  # the marker (its dtype names the float8 dtype)
    return fvt.ParamTree(out)


def adapter_for(tree: fvt.ParamTree, seed: int = 1, rank: int = 4, scale_b: float = 0.05) -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(tree, targets="blocks.*.weight", rank=rank, seed=seed, scale_b=scale_b)


def adapter_of(tree: fvt.ParamTree, pattern: str, seed: int = 1) -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(tree, targets=pattern, rank=4, seed=seed, scale_b=0.05)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ----------------------------------------------------------------------------- the oracle in float64
def nearest_f64(y: torch.Tensor, dtype: torch.dtype, tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round float64 ``y`` to float8 by the grid (ties to the even code): (nearest, low, high) values, and where
    ``y`` lies within ``tol`` of a midpoint the float32 path may land on either neighbour (low/high)."""
    near, lo, hi, mid = fp8_neighbours(y, dtype)
    near_band = (y.abs() - mid).abs() <= tol
    return near, torch.where(near_band, lo, near), torch.where(near_band, hi, near)


def check_nearest(merged: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor | None, d: fvt.lora.LowRank, s: float = 1.0,
                  new_scale: torch.Tensor | None = None) -> None:
    y, tol = merged_f64(w8, scale, d, s, new_scale)
    _, low, high = nearest_f64(y, merged.dtype, tol)
    got = merged.double()
    assert bool(((got == low) | (got == high)).all()), (got - y).abs().max()
    assert int((low != high).sum()) <= max(1, y.numel() // 100)  # the band is narrow: the check above has teeth


# ----------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_merge_into_fp8_rounds_once_from_float32_and_keeps_the_layout(scaled):
    tree = fp8_tree(wan_tree(), scaled=scaled)
    adapter = adapter_for(tree)
    merged = fvt.lora.merge(tree, adapter, 0.75)
    assert set(merged) == set(tree)
    for k, d in adapter.items():
        assert merged[k].dtype == E4 and not same_bytes(merged[k], tree[k])
        scale = tree[scale_key(k)] if scaled else None
        check_nearest(merged[k], tree[k], scale, d, 0.75)
        if scaled:
            assert merged[scale_key(k)] is tree[scale_key(k)]  # the kept scale: the file stays compatible
    for k in set(tree) - set(adapter):
        assert merged[k] is tree[k]  # untouched tensors (the marker too) shared


def test_kept_scale_merge_equals_the_fp8_arithmetic_of_one_rounding():
    """The documented formula exactly: ``quantize(dequantize(W, s) + B@A in float32, s)`` (one rounding)."""
    tree = fp8_tree(wan_tree(blocks=1), scaled=True)
    adapter = adapter_for(tree)
    merged = fvt.lora.merge(tree, adapter)
    for k, d in adapter.items():
        s = tree[scale_key(k)]
        want = quantize_tensor(torch.addmm(dequantize_tensor(tree[k], s, torch.float32), d.B * d.scale, d.A), E4, s)
        assert same_bytes(merged[k], want), k


def test_recompute_sets_the_amax_scale_and_updates_the_scale_key():
    tree = fp8_tree(wan_tree(blocks=1), scaled=True)
    adapter = adapter_for(tree, scale_b=0.5)
    merged = fvt.lora.merge(tree, adapter, fp8_scale="recompute")
    for k, d in adapter.items():
        new = merged[scale_key(k)]
        assert new.shape == tree[scale_key(k)].shape and new.dtype == torch.float32
        y, _ = merged_f64(tree[k], tree[scale_key(k)], d)
        amax = float((y * float(tree[scale_key(k)])).abs().max())
        assert float(new) == pytest.approx(amax / 448.0, rel=1e-5) and float(new) * 448.0 >= amax * (1 - 1e-6)
        assert float(merged[k].float().abs().max()) >= 416.0  # the largest value lands at the top of the range
        check_nearest(merged[k], tree[k], tree[scale_key(k)], d, 1.0, new)


_KW = [{}, {"fp8_scale": "recompute"}, {"rounding": "stochastic", "seed": 7},
       {"fp8_scale": "recompute", "rounding": "stochastic", "seed": 1, "saturate": True}]


# plain weights have no scale to recompute (refused: test_recompute_on_plain_is_refused)
@pytest.mark.parametrize("scaled, kw", [(s, kw) for s in (False, True) for kw in _KW if s or "fp8_scale" not in kw],
                         ids=lambda v: ("scaled" if v else "plain") if isinstance(v, bool) else "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_restore_gives_back_the_original_fp8_bytes_and_scale(scaled, kw):
    tree = fp8_tree(wan_tree(blocks=1), scaled=scaled)
    adapter = adapter_for(tree, scale_b=0.2)
    merged, record = fvt.lora.merge_with_record(tree, adapter, **kw)
    assert same_bytes(merged["blocks.0.ffn.0.weight"], fvt.lora.merge(tree, adapter, **kw)["blocks.0.ffn.0.weight"])
    back = fvt.lora.restore(merged, record)
    assert set(back) == set(tree)
    for k in tree:
        assert same_bytes(back[k], tree[k]), k
    assert record.nbytes <= record.targets_nbytes * 2  # bit steps, at most about one byte per float8 element


def test_stochastic_rounding_is_seeded_per_key_and_reproducible():
    tree = fp8_tree(wan_tree(), scaled=True)
    adapter = adapter_for(tree)
    one = fvt.lora.merge(tree, adapter, rounding="stochastic", seed=3)
    again = fvt.lora.merge(tree, adapter, rounding="stochastic", seed=3)
    other = fvt.lora.merge(tree, adapter, rounding="stochastic", seed=4)
    key = "blocks.1.ffn.0.weight"
    assert all(same_bytes(one[k], again[k]) for k in adapter)
    assert not same_bytes(one[key], other[key])
    alone = fvt.lora.merge(tree, fvt.lora.LoraAdapter({key: adapter[key]}), rounding="stochastic", seed=3)
    assert same_bytes(alone[key], one[key])  # the draws of a key do not depend on the other keys
    nearest = fvt.lora.merge(tree, adapter)
    for k, d in adapter.items():  # each element is one of the two neighbours of the exact sum
        y, tol = merged_f64(tree[k], tree[scale_key(k)], d)
        lo, hi = _neighbours(y, tol)
        assert between(one[k].double(), lo, hi), k
    assert any(not same_bytes(one[k], nearest[k]) for k in adapter)


def between(got: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Every float8 value ``got`` lies in ``[lo, hi]`` (either order): one of the neighbours of a value within the tolerance."""
    return bool(((got >= torch.minimum(lo, hi)) & (got <= torch.maximum(lo, hi))).all())


def _neighbours(y: torch.Tensor, tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float8 values just below ``|y| - tol`` and just above ``|y| + tol`` (signed like ``y``)."""
    grid = fp8_grid(E4)
    mag = y.abs()
    lo_i = (torch.searchsorted(grid, mag - tol, right=True) - 1).clamp(0, grid.numel() - 1)
    hi_i = torch.searchsorted(grid, mag + tol).clamp(max=grid.numel() - 1)
    sign = torch.where(y < 0, -1.0, 1.0).double()
    return sign * grid[lo_i], sign * grid[hi_i]


def test_donated_fp8_merge_writes_into_the_weights_and_equals_the_copy():
    tree = fp8_tree(wan_tree(blocks=1), scaled=True)
    adapter = adapter_for(tree)
    want = fvt.lora.merge(tree, adapter)
    mine = fvt.ParamTree({k: v.clone() for k, v in tree.items()})
    ptr = mine["blocks.0.self_attn.q.weight"].data_ptr()
    got = fvt.lora.merge(mine, adapter, donate=True)
    assert got["blocks.0.self_attn.q.weight"].data_ptr() == ptr
    assert all(same_bytes(got[k], want[k]) for k in want)


def test_e5m2_weights_merge_too():
    tree = fp8_tree(wan_tree(blocks=1), scaled=True, dtype=torch.float8_e5m2)
    adapter = adapter_for(tree)
    merged = fvt.lora.merge(tree, adapter)
    for k, d in adapter.items():
        assert merged[k].dtype == torch.float8_e5m2
        check_nearest(merged[k], tree[k], tree[scale_key(k)], d)


# ----------------------------------------------------------------------------- disk to disk
@pytest.mark.parametrize("kw", [{}, {"fp8_scale": "recompute", "rounding": "stochastic", "seed": 11}])
def test_merge_checkpoint_streams_fp8_to_the_bytes_of_the_in_memory_merge(tmp_path, kw):
    tree = fp8_tree(wan_tree(), scaled=True)
    adapter = adapter_of(tree, "blocks.*.self_attn.*.weight")
    fvt.save(tree, tmp_path / "base", max_shard_size="8KB")
    out = fvt.lora.merge_checkpoint(tmp_path / "base", adapter, tmp_path / "out", **kw)
    got = fvt.load(out)
    want = fvt.lora.merge(tree, adapter, **kw)
    assert set(got) == set(want)
    for k in want:
        assert same_bytes(got[k], want[k]), k
    changed = {k for k in want if not same_bytes(want[k], tree[k])}
    expect = set(adapter) | ({scale_key(k) for k in adapter} if kw else set())
    assert changed == expect and got["scaled_fp8"].dtype == E4  # the marker kept, fp8 stays fp8
    fvt.lora.merge_checkpoint(tmp_path / "base", adapter, tmp_path / "again", **kw)
    for f in sorted((tmp_path / "out").iterdir()):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes(), f.name  # deterministic per seed


def test_untouched_tensors_of_an_fp8_file_are_copied_byte_for_byte(tmp_path):
    from fvtransform.io._header import read_header

    tree = fp8_tree(wan_tree(blocks=1), scaled=True)
    adapter = adapter_of(tree, "blocks.0.ffn.*.weight")
    fvt.save(tree, tmp_path / "base.safetensors")
    fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")
    base, out = (tmp_path / "base.safetensors").read_bytes(), (tmp_path / "out.safetensors").read_bytes()
    hb, ho = read_header(tmp_path / "base.safetensors"), read_header(tmp_path / "out.safetensors")
    for k in tree:
        if k in adapter:
            continue
        ib, io = hb.tensors[k], ho.tensors[k]
        assert base[ib.start:ib.start + ib.nbytes] == out[io.start:io.start + io.nbytes], k


def test_cli_merge_fp8_flags_stream_the_same_bytes(tmp_path, capsys):
    from fvtransform.cli._main import main

    tree = fp8_tree(wan_tree(blocks=1), scaled=True)
    adapter = adapter_of(tree, "blocks.0.cross_attn.*.weight")
    fvt.save(tree, tmp_path / "base.safetensors")
    fvt.lora.save(adapter, tmp_path / "lora.safetensors", format="comfy")
    args = ["--json", "merge", str(tmp_path / "base.safetensors"), f"{tmp_path / 'lora.safetensors'}:0.5",
            "-o", str(tmp_path / "out.safetensors"), "--fp8-scale", "recompute", "--rounding", "stochastic", "--seed", "5"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["merged"][0]["scale"] == 0.5
    loaded = fvt.lora.load(tmp_path / "lora.safetensors", base=tree)
    want = fvt.lora.merge(tree, loaded, 0.5, fp8_scale="recompute", rounding="stochastic", seed=5)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert all(same_bytes(got[k], want[k]) for k in want)
    assert main(args[:-6] + ["--seed", "5"]) != 0  # a seed with rounding to nearest: refused
    assert "stochastic" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def _one(scaled: bool = True, **over: torch.Tensor) -> fvt.ParamTree:
    base = {k: v for k, v in fp8_tree(wan_tree(blocks=1), scaled=scaled).items() if k.startswith("blocks.0.ffn.0.") or k == "scaled_fp8"}
    base.update(over)
    return fvt.ParamTree(base)


def test_overflow_names_the_key_and_the_largest_value_and_saturate_clamps():
    tree = _one()
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    with pytest.raises(NumericError, match=r"'blocks\.0\.ffn\.0\.weight'.*largest magnitude [0-9.e+]+ after dividing by the scale.*saturate=True"):
        fvt.lora.merge(tree, adapter, 500.0)
    clamped = fvt.lora.merge(tree, adapter, 500.0, saturate=True)["blocks.0.ffn.0.weight"]
    assert float(clamped.float().abs().max()) == 448.0
    rescaled = fvt.lora.merge(tree, adapter, 500.0, fp8_scale="recompute")  # a new scale holds it
    assert float(rescaled["blocks.0.ffn.0.scale_weight"]) > float(tree["blocks.0.ffn.0.scale_weight"])


def test_overflow_on_disk_names_the_file_and_key_and_writes_nothing(tmp_path):
    tree = _one()
    fvt.save(tree, tmp_path / "base.safetensors")
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    with pytest.raises(NumericError, match=r"base\.safetensors: 'blocks\.0\.ffn\.0\.weight'.*overflows.*largest magnitude"):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", [(adapter, 500.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("scale, error, match", [
    (torch.tensor(float("nan")), NumericError, r"scale 'blocks\.0\.ffn\.0\.scale_weight' is nan.*finite positive"),
    (torch.tensor(0.0), NumericError, r"scale 'blocks\.0\.ffn\.0\.scale_weight' is 0\.0"),
    (torch.ones(2), FormatError, r"scale 'blocks\.0\.ffn\.0\.scale_weight' has shape \[2\]; expected one element"),
    (torch.ones((), dtype=torch.int32), FormatError, r"scale 'blocks\.0\.ffn\.0\.scale_weight' is torch\.int32; expected one of"),
    (torch.ones((), dtype=E4), FormatError, r"'blocks\.0\.ffn\.0\.scale_weight' is torch\.float8_e4m3fn"),
])
def test_bad_scales_are_typed_errors_in_memory_and_on_disk(tmp_path, scale, error, match):
    tree = _one(**{"blocks.0.ffn.0.scale_weight": scale})
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    with pytest.raises(error, match=match):
        fvt.lora.merge(tree, adapter)
    fvt.save(tree, tmp_path / "base.safetensors")
    with pytest.raises(error, match=r"base\.safetensors.*" + match):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")


def test_nan_in_an_fp8_weight_is_a_numeric_error():
    w = _one()["blocks.0.ffn.0.weight"].clone()
    w.view(torch.uint8)[0, 0] = 0x7F  # the float8_e4m3fn NaN
    tree = _one(**{"blocks.0.ffn.0.weight": w})
    with pytest.raises(NumericError, match=r"'blocks\.0\.ffn\.0\.weight'.*NaN/Inf"):
        fvt.lora.merge(tree, adapter_of(tree, "blocks.0.ffn.0.weight"))


def test_a_scale_without_its_weight_is_a_format_error(tmp_path):
    tree = _one(**{"blocks.0.gone.scale_weight": torch.tensor(1.0)})
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    with pytest.raises(FormatError, match=r"scale key 'blocks\.0\.gone\.scale_weight' has no weight 'blocks\.0\.gone\.weight'"):
        fvt.lora.merge(tree, adapter)
    fvt.save(tree, tmp_path / "base.safetensors")
    with pytest.raises(FormatError, match=r"base\.safetensors: scale key 'blocks\.0\.gone\.scale_weight'"):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")


def test_a_scale_beside_a_non_fp8_weight_is_refused():
    tree = _one()
    mixed = fvt.ParamTree({**tree, "blocks.0.ffn.0.weight": tree["blocks.0.ffn.0.weight"].float(), "x.weight": torch.ones(2, 2, dtype=E4)})
    adapter = fvt.lora.LoraAdapter({"blocks.0.ffn.0.weight": adapter_of(tree, "blocks.0.ffn.0.weight")["blocks.0.ffn.0.weight"],
                                    "x.weight": fvt.lora.LowRank(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
    # a dtype other than the one required beside a scale: ShapeMismatchError, as fvt.dequantize says of the same tree
    with pytest.raises(ShapeMismatchError, match=r"'blocks\.0\.ffn\.0\.weight' is torch\.float32 and has a scale 'blocks\.0\.ffn\.0\.scale_weight'"):
        fvt.lora.merge(mixed, adapter)


@pytest.mark.parametrize("kw, match", [
    ({"fp8_scale": "auto"}, r"fp8_scale='auto': expected one of \['keep', 'recompute'\]"),
    ({"rounding": "floor"}, r"rounding='floor': expected one of \['nearest', 'stochastic'\]"),
    ({"seed": 3}, r"seed=3 is used by stochastic rounding only; pass rounding='stochastic', seed=3"),
    ({"rounding": "stochastic", "seed": -1}, r"seed=-1: expected a nonnegative int"),
    ({"saturate": 1}, r"saturate=1: expected True or False"),
])
def test_option_mistakes_are_usage_errors(kw, match):
    tree = _one()
    with pytest.raises(UsageError, match=match):
        fvt.lora.merge(tree, adapter_of(tree, "blocks.0.ffn.0.weight"), **kw)


def test_fp8_options_without_an_fp8_target_are_refused(tmp_path):
    tree = fvt.ParamTree(wan_tree(blocks=1))
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    with pytest.raises(UsageError, match=r"apply to float8 weights, and no targeted weight is float8"):
        fvt.lora.merge(tree, adapter, rounding="stochastic")
    fvt.save(tree, tmp_path / "base.safetensors")
    with pytest.raises(UsageError, match=r"merge_checkpoint: .*no targeted weight is float8"):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "o.safetensors", saturate=True)


def test_recompute_on_plain_is_refused():
    tree = _one(scaled=False)
    with pytest.raises(UsageError, match=r"'blocks\.0\.ffn\.0\.weight'.*fp8_scale='recompute' updates a scale_weight.*plain"):
        fvt.lora.merge(tree, adapter_of(tree, "blocks.0.ffn.0.weight"), fp8_scale="recompute")


def test_arithmetic_unmerge_of_fp8_is_refused_with_the_record_named():
    tree = _one()
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    merged = fvt.lora.merge(tree, adapter)
    with pytest.raises(UsageError, match=r"'blocks\.0\.ffn\.0\.weight' is torch\.float8_e4m3fn.*fvt\.lora\.merge_with_record.*fvt\.lora\.restore"):
        fvt.lora.unmerge(merged, adapter)


def test_dora_and_dtype_casts_into_fp8_are_refused(tmp_path):
    tree = _one()
    d = adapter_of(tree, "blocks.0.ffn.0.weight")["blocks.0.ffn.0.weight"]
    assert isinstance(d, fvt.lora.LowRank)
    dora = fvt.lora.LoraAdapter({"blocks.0.ffn.0.weight": fvt.lora.LowRank(d.A, d.B, d.scale, d.alpha, magnitude=torch.ones(64))})
    with pytest.raises(UsageError, match=r"'blocks\.0\.ffn\.0\.weight' is float8 and this merge has a DoRA adapter.*fvt\.dequantize"):
        fvt.lora.merge(tree, dora)
    fvt.save(tree, tmp_path / "base.safetensors")
    with pytest.raises(UsageError, match=r"base\.safetensors: dtype=torch\.bfloat16 with float8 targets"):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter_of(tree, "blocks.0.ffn.0.weight"),
                                  tmp_path / "out.safetensors", dtype="bf16")


# ----------------------------------------------------------------------------- ComfyUI's result (golden)
def test_nearest_merge_lands_on_a_neighbour_comfyui_chose_between():
    """ComfyUI rounds float8 stochastically (its own seed scheme and draws): no byte equality is claimed.

    Both results must be one of the two float8 neighbours of the same float32 sum, and where the sum is a
    float8 value exactly both must be it; ComfyUI's bytes are in the fixture (README: tool, commit, script).
    """
    base = load_file(str(FIXTURES / "base.safetensors"))
    comfy = load_file(str(FIXTURES / "comfyui_merged.safetensors"))
    tree = fvt.ParamTree(base)
    lora = fvt.lora.load(FIXTURES / "lora.safetensors", base=tree)
    strength = float(json.loads((FIXTURES / "case.json").read_text())["strength"])
    ours = fvt.lora.merge(tree, lora, strength)
    assert set(comfy) == set(lora)
    for k, d in lora.items():
        y, tol = merged_f64(tree[k], tree[scale_key(k)], d, strength)
        lo, hi = _neighbours(y, tol)
        for got in (ours[k].double(), comfy[k].double()):
            assert between(got, lo, hi), k
        steps = (bits(ours[k]).to(torch.int16) - bits(comfy[k]).to(torch.int16)).abs()
        assert int(steps.max()) <= 1 and 0.05 < float((steps == 0).double().mean()) < 1.0, k


def test_a_merge_proved_in_range_skips_the_check_and_gives_the_same_bytes(monkeypatch):
    """With headroom, (max|W| + the factors' bound) / scale is inside the float8 range: no per-tile range pass, the
    same bytes as the checked path; at the tight amax scale (headroom 1) nothing is proved and an overflow is caught."""
    from fvtransform.lora import _fp8_merge

    tree = _one()
    adapter = adapter_of(tree, "blocks.0.ffn.0.weight")
    proved: list[bool] = []
    real = _fp8_merge._proved_in_range
    monkeypatch.setattr(_fp8_merge, "_proved_in_range", lambda *a: proved.append(real(*a)) or proved[-1])
    fast = fvt.lora.merge(tree, adapter)
    assert proved == [True]
    monkeypatch.setattr(_fp8_merge, "_proved_in_range", lambda *a: False)
    assert same_bytes(fast["blocks.0.ffn.0.weight"], fvt.lora.merge(tree, adapter)["blocks.0.ffn.0.weight"])
    monkeypatch.setattr(_fp8_merge, "_proved_in_range", real)
    tight = fvt.ParamTree({k: v for k, v in fp8_tree(wan_tree(blocks=1), scaled=True, headroom=1.0).items()
                           if k.startswith("blocks.0.ffn.0.") or k == "scaled_fp8"})
    with pytest.raises(NumericError, match=r"'blocks\.0\.ffn\.0\.weight'.*overflows"):
        fvt.lora.merge(tight, adapter_of(tight, "blocks.0.ffn.0.weight"), 50.0)
