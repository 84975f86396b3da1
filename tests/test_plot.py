"""Pictures of what an update changes: fvt.lora.update_norms, `inspect --plot`, `diff` (fvtransform/cli/_plot.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

import fvtransform as fvt
from fvtransform.cli import main
from fvtransform.cli._plot import DPI, figure_size
from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.lora._norms import split_block
from fvtransform.models import init_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree() -> fvt.ParamTree:
    return fvt.ParamTree(init_weights(fvt.build("fvt-video-dit", config={"num_layers": 3}), seed=0))


@pytest.fixture(scope="module")
def adapter(tree):
    return fvt.lora.random_adapter(tree, targets=["blocks.0.attn1.to_*.weight", "blocks.2.ffn.net.2.weight"], rank=2,
                                   seed=1, scale_b=0.1)


def _direct(w: torch.Tensor, delta: torch.Tensor) -> float:
    return float(delta.double().norm() / w.double().norm())


def test_lora_update_norms_are_the_direct_computation(tree, adapter):
    norms = fvt.lora.update_norms(tree, adapter)
    assert set(norms.by_key) == set(adapter)
    for key, d in adapter.items():
        want = _direct(tree[key], d.scale * (d.B.double() @ d.A.double()))
        assert norms.by_key[key] == pytest.approx(want, rel=1e-5), key
    # the grid: every block, every matrix weight of a block; blank (nan) where the LoRA does not reach
    assert norms.rows == ("blocks.0", "blocks.1", "blocks.2")
    assert norms.columns[:4] == ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    assert "attn2.to_q" in norms.columns and "ffn.net.2" in norms.columns and norms.layout == "diffusers Wan"
    cell = dict(zip(norms.columns, norms.grid[0]))
    assert cell["attn1.to_q"] == norms.by_key["blocks.0.attn1.to_q.weight"] and math.isnan(cell["attn2.to_q"])
    assert all(math.isnan(x) for x in norms.grid[1])  # block 1: untouched
    assert norms.unchanged == len(tree) - len(adapter) and norms.outside == () and norms.leftovers == ()


def test_tree_update_norms_are_the_direct_computation(tree, adapter):
    after = fvt.lora.merge(tree, adapter)
    after = fvt.update(after, {"patch_embedding.weight": tree["patch_embedding.weight"] * 1.5})
    norms = fvt.lora.update_norms(tree, after)
    changed = {k for k in tree if not torch.equal(tree[k], after[k])}
    assert set(norms.by_key) == changed == set(adapter) | {"patch_embedding.weight"}
    for key in changed:
        assert norms.by_key[key] == pytest.approx(_direct(tree[key], after[key].double() - tree[key].double()), rel=1e-9)
    assert norms.by_key["patch_embedding.weight"] == pytest.approx(0.5)
    assert norms.outside == ("patch_embedding.weight",)  # outside the blocks: listed, not drawn
    assert norms.unchanged == len(tree) - len(changed)
    doc = json.loads(json.dumps(norms.to_dict()))
    assert doc["grid"][1] == [None] * len(norms.columns) and doc["by_key"]["patch_embedding.weight"] == pytest.approx(0.5)


@pytest.mark.parametrize("key, where", [
    ("blocks.7.attn1.to_out.0.weight", ("blocks.7", "attn1.to_out.0")),
    ("model.diffusion_model.blocks.12.self_attn.q.weight", ("model.diffusion_model.blocks.12", "self_attn.q")),
    ("single_transformer_blocks.3.proj_mlp.weight", ("single_transformer_blocks.3", "proj_mlp")),
    ("blocks.0.modulation", ("blocks.0", "modulation")),
    ("head.head.weight", None),
])
def test_keys_split_into_block_and_module_by_the_layout_table(key, where):
    assert split_block(key) == where


def test_original_wan_names_get_their_layouts_column_order():
    names = ["blocks.0.ffn.2.weight", "blocks.0.cross_attn.q.weight", "blocks.0.self_attn.o.weight", "blocks.0.self_attn.q.weight"]
    base = fvt.ParamTree({k: torch.ones(2, 2) for k in names})
    norms = fvt.lora.update_norms(base, fvt.ParamTree({k: torch.full((2, 2), 2.0) for k in names}))
    assert norms.layout == "original Wan"
    assert norms.columns == ("self_attn.q", "self_attn.o", "cross_attn.q", "ffn.2")
    assert norms.grid == ((1.0, 1.0, 1.0, 1.0),)


def test_update_norms_refuses_what_it_cannot_compare(tree, adapter):
    fewer = fvt.select(tree, "blocks.*")
    with pytest.raises(KeyMismatchError, match=r"only in base .*patch_embedding.weight.*strict=False"):
        fvt.lora.update_norms(tree, fewer)
    loose = fvt.lora.update_norms(tree, fewer, strict=False)
    assert ("base", "patch_embedding.weight") in loose.leftovers and loose.by_key == {}
    bigger = dict(tree)
    bigger["blocks.0.attn1.to_q.weight"] = torch.zeros(16, 8)
    with pytest.raises(ShapeMismatchError, match=r"'blocks.0.attn1.to_q.weight' has shape \[16, 16\] in base and \[16, 8\]"):
        fvt.lora.update_norms(tree, bigger)
    with pytest.raises(KeyMismatchError, match=r"targets 1 keys the base lacks: .*blocks.2.ffn.net.2.weight"):
        fvt.lora.update_norms(fvt.select(tree, "blocks.0.*"), adapter)
    with pytest.raises(UsageError, match=r"other must be a LoraAdapter or a Mapping\[str, Tensor\]; found str"):
        fvt.lora.update_norms(tree, "my_lora.safetensors")
    with pytest.raises(UsageError, match="strict must be True or False"):
        fvt.lora.update_norms(tree, tree, strict="no")


@pytest.fixture()
def files(tmp_path, tree, adapter):
    fvt.save(tree, tmp_path / "base")
    fvt.lora.save(adapter, tmp_path / "lora.safetensors", format="kohya")
    fvt.save(fvt.lora.merge(tree, adapter), tmp_path / "tuned")
    return tmp_path


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _expected_pixels(rows: int, columns: int) -> tuple[int, int]:
    w, h = figure_size(rows, columns)
    return round(w * DPI), round(h * DPI)


def test_inspect_plot_draws_the_lora_update(files, tree, adapter, capsys):
    out = files / "lora.png"
    assert main(["inspect", str(files / "lora.safetensors"), "--base", str(files / "base"), "--plot", str(out)]) == 0
    norms = fvt.lora.update_norms(tree, adapter)
    assert _png_size(out) == _expected_pixels(len(norms.rows), len(norms.columns)) == (710, 300)
    assert f"plot: {out}" in capsys.readouterr().out
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    white = (pixels[..., :3] > 0.99).all(axis=-1).mean()
    assert 0.3 < white < 0.95  # blank cells (and margins) are white; the touched ones are coloured


def test_diff_gives_the_numbers_of_update_norms(files, tree, adapter, capsys):
    out = files / "diff.png"
    assert main(["diff", str(files / "base"), str(files / "tuned"), "--plot", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    want = fvt.lora.update_norms(fvt.load(files / "base"), fvt.load(files / "tuned"))
    assert doc["by_key"] == pytest.approx(dict(want.by_key)) and set(doc["by_key"]) == set(adapter)
    assert doc["rows"] == list(want.rows) and doc["plot"] == str(out)
    assert _png_size(out) == _expected_pixels(len(want.rows), len(want.columns))
    assert main(["diff", str(files / "base"), str(files / "tuned")]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.attn1.to_q.weight" in text and f"{len(adapter)} changed, {len(tree) - len(adapter)} unchanged" in text


def test_diff_lists_keys_of_one_side_and_exits_1(files, tree, capsys):
    fvt.save(fvt.select(tree, "blocks.*"), files / "fewer")
    assert main(["diff", str(files / "base"), str(files / "fewer")]) == 1
    assert "only in base: patch_embedding.weight" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "{d}/lora.safetensors", "--plot", "{d}/x.png"], r"--plot .* draws a LoRA's update relative to its base.*--base BASE"),
    (["diff", "{d}/base", "{d}/tuned", "--plot", "{d}/x.jpg"], r"the picture is a PNG; name it like out.png"),
    (["diff", "{d}/base", "{d}/nowhere"], r"nowhere"),
])
def test_plot_mistakes_are_one_line_errors(files, capsys, argv, message):
    assert main([a.format(d=files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fvtransform: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (files / "x.png").exists() and not (files / "x.jpg").exists()


def test_without_matplotlib_plot_names_the_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    assert main(["diff", str(files / "base"), str(files / "tuned"), "--plot", str(files / "x.png")]) == 2
    assert main(["inspect", str(files / "lora.safetensors"), "--base", str(files / "base"), "--plot", str(files / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["fvtransform: error: --plot needs matplotlib: pip install 'fvtransform[plot]'"] * 2


def test_diff_help_imports_no_torch():
    code = ("import sys\nfrom fvtransform.cli import main\ntry:\n    main(['diff', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--plot OUT.png" in out.stdout and out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_the_guides_picture_script_still_runs(tmp_path):
    out = tmp_path / "picture.png"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_lora_example.py"), str(out)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    committed = ROOT / "docs" / "img" / "lora-update-norms.png"
    assert _png_size(out) == _png_size(committed) == _expected_pixels(12, 10)
    assert "(../img/lora-update-norms.png)" in (ROOT / "docs" / "guides" / "lora.md").read_text()


def _two(tmp_path: Path) -> tuple[str, str]:
    from safetensors.torch import save_file

    a = {"blocks.0.attn1.to_q.weight": torch.ones(4, 4), "blocks.1.attn1.to_q.weight": torch.ones(4, 4)}
    b = dict(a, **{"blocks.0.attn1.to_q.weight": torch.full((4, 4), 1.5)})
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return str(pa), str(pb)


def test_plot_replaces_its_own_picture_and_a_users_file_only_with_overwrite(tmp_path, capsys):
    a, b = _two(tmp_path)
    out = tmp_path / "x.png"
    assert main(["diff", a, b, "--plot", str(out)]) == 0
    assert main(["diff", a, b, "--plot", str(out)]) == 0  # a plot fvtransform wrote is replaced
    out.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    assert main(["diff", a, b, "--plot", str(out)]) == 2
    assert out.read_bytes() == b"\x89PNG\r\n\x1a\nnot ours"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["diff", a, b, "--plot", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 100


def test_plot_through_a_symlinked_folder_into_an_input_is_refused(tmp_path, capsys):
    a, b = _two(tmp_path)
    ck = tmp_path / "ckpt"
    ck.mkdir()
    os.replace(a, ck / "model.safetensors")
    (tmp_path / "link").symlink_to(ck)
    assert main(["diff", str(ck), b, "--plot", str(tmp_path / "link" / "x.png")]) == 2
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors"]
    assert "inside" in capsys.readouterr().err


def test_update_norms_refuses_a_scaled_float8_tree_and_names_dequantize():
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    a = fvt.ParamTree({"blocks.0.attn1.to_q.weight": w.to(torch.float8_e4m3fn), "blocks.0.attn1.to_q.scale_weight": torch.tensor(2.0)})
    b = fvt.ParamTree({"blocks.0.attn1.to_q.weight": w, "blocks.0.attn1.to_q.scale_weight": torch.tensor(1.0)})
    with pytest.raises(UsageError, match=r"'blocks\.0\.attn1\.to_q\.weight' in base is a scaled float8.*fvt\.dequantize"):
        fvt.lora.update_norms(a, b)


def test_nan_and_integer_updates_are_numbers_in_json_and_by_key():
    a = fvt.ParamTree({"blocks.0.attn1.to_q.weight": torch.ones(2, 2), "blocks.0.attn1.to_k.weight": torch.ones(2, 2),
                       "blocks.0.pos": torch.tensor([3, 4])})
    b = fvt.ParamTree({"blocks.0.attn1.to_q.weight": torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]),
                       "blocks.0.attn1.to_k.weight": torch.ones(2, 2), "blocks.0.pos": torch.tensor([3, 5])})
    n = fvt.lora.update_norms(a, b)
    assert n.by_key["blocks.0.pos"] == pytest.approx(1 / 5)  # ||(0, 1)|| / ||(3, 4)||
    doc = n.to_dict()
    cells = dict(zip(doc["columns"], doc["grid"][0]))
    assert cells["attn1.to_q"] == "nan" and cells["attn1.to_k"] is None and doc["by_key"]["blocks.0.attn1.to_q.weight"] == "nan"


def test_a_huge_grid_is_grouped_and_the_output_line_says_so(tmp_path, capsys):
    from safetensors.torch import save_file

    from fvtransform.cli._plot import MAX_PIXELS

    a = {f"blocks.{i}.attn1.to_q.weight": torch.ones(1) for i in range(1000)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({k: v * 2 for k, v in a.items()}, str(tmp_path / "b.safetensors"))
    out = tmp_path / "x.png"
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--plot", str(out)]) == 0
    assert max(_png_size(out)) <= MAX_PIXELS
    assert re.search(r"^plot: .*x\.png \(grouped: 4 blocks x 1 modules a cell", capsys.readouterr().out, re.M)
