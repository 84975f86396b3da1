"""An outside tester's attack on `inspect --plot`, `diff [--plot] [--json]` and fvt.lora.update_norms (issue 22).

Each test fails on the code as attacked and states the behaviour that was promised (docs/guides/lora.md,
docs/guides/cli.md, the team's general promises: one-line errors with exit code 2, writers that never
overwrite what they did not write, bounded memory and time, numbers that are right).
"""

from __future__ import annotations

import importlib.abc
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fvtransform as fvt
from fvtransform.cli import main


def _pair(tmp_path, a: dict, b: dict):
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return str(pa), str(pb)


def _simple(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g),
         "blocks.1.attn1.to_q.weight": torch.randn(8, 8, generator=g)}
    b = {k: v.clone() for k, v in a.items()}
    b["blocks.0.attn1.to_q.weight"] += 0.1
    return _pair(tmp_path, a, b)


def _png_size(path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# 1
def test_plot_does_not_overwrite_a_file_fvtransform_did_not_write(tmp_path, capsys):
    # wrong: `diff A B --plot notes.png` silently replaces an existing user file with the picture
    a, b = _simple(tmp_path)
    out = tmp_path / "notes.png"
    out.write_text("my own notes, not a picture\n")
    rc = main(["diff", a, b, "--plot", str(out)])
    assert out.read_bytes() == b"my own notes, not a picture\n"
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.png" in err


# 2
def test_plot_is_refused_inside_an_input_checkpoint_folder(tmp_path, capsys):
    # wrong: `diff ckpt/ B --plot ckpt/x.png` writes into the input checkpoint folder (outputs never go inside an input)
    a, b = _simple(tmp_path)
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(Path(a).read_bytes())
    rc = main(["diff", str(ck), b, "--plot", str(ck / "x.png")])
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors"]
    assert rc == 2


# 3
def test_diff_float32_against_float8_is_not_a_traceback(tmp_path, capsys):
    # wrong: `diff f32.safetensors f8.safetensors` dies with RuntimeError "Promotion for Float8 Types" (traceback)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    a, b = _pair(tmp_path, {"blocks.0.attn1.to_q.weight": w},
                 {"blocks.0.attn1.to_q.weight": w.to(torch.float8_e4m3fn)})
    rc = main(["diff", a, b])
    assert rc in (0, 1, 2)
    if rc == 2:
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


# 4
def test_update_norms_float8_tree_is_the_float64_difference():
    # wrong: update_norms(fp8 tree, f32 tree) raises a raw RuntimeError instead of ||b - a|| / ||a|| in float64
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    a = fvt.ParamTree({"blocks.0.attn1.to_q.weight": w.to(torch.float8_e4m3fn)})
    b = fvt.ParamTree({"blocks.0.attn1.to_q.weight": w})
    n = fvt.lora.update_norms(a, b)
    wa = a["blocks.0.attn1.to_q.weight"].double()
    want = float((w.double() - wa).norm() / wa.norm())
    assert n.by_key["blocks.0.attn1.to_q.weight"] == pytest.approx(want, rel=1e-6)


# 5
def test_bit_identical_tensor_holding_nan_is_unchanged():
    # wrong: a tensor equal bit for bit on both sides but holding a NaN is reported as changed, ratio inf
    t = torch.tensor([float("nan"), 1.0, 2.0])
    a = fvt.ParamTree({"blocks.0.norm.weight": t.clone(), "blocks.0.attn1.to_q.weight": torch.ones(2, 2)})
    b = fvt.ParamTree({"blocks.0.norm.weight": t.clone(), "blocks.0.attn1.to_q.weight": torch.ones(2, 2)})
    n = fvt.lora.update_norms(a, b)
    assert dict(n.by_key) == {} and n.unchanged == 2


# 6
def test_nan_update_is_not_drawn_as_untouched(tmp_path, capsys):
    # wrong: a weight that became NaN gets a null grid cell in --json, the same as an untouched (blank) module
    a, b = _simple(tmp_path)
    from safetensors.torch import load_file
    bb = load_file(b)
    bb["blocks.1.attn1.to_q.weight"][0, 0] = float("nan")
    save_file(bb, b)
    rc = main(["diff", a, b, "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    cell = dict(zip(doc["columns"], doc["grid"][doc["rows"].index("blocks.1")]))
    assert cell["attn1.to_q"] is not None  # changed (to NaN): must differ from the blank of an untouched module


# 7
def test_changed_integer_tensor_is_not_counted_unchanged():
    # wrong: an integer tensor whose values differ is silently counted in `unchanged` (listed nowhere)
    a = fvt.ParamTree({"blocks.0.pos.weight": torch.tensor([1, 2, 3]), "blocks.0.attn1.to_q.weight": torch.ones(2, 2)})
    b = fvt.ParamTree({"blocks.0.pos.weight": torch.tensor([1, 2, 4]), "blocks.0.attn1.to_q.weight": torch.ones(2, 2)})
    n = fvt.lora.update_norms(a, b)
    assert n.unchanged == 1
    assert "blocks.0.pos.weight" in n.by_key or "blocks.0.pos.weight" in repr(n)


# 8
class _BrokenMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("libpng16.so.16: cannot open shared object file (a broken matplotlib install)")


def test_broken_matplotlib_is_a_one_line_error_naming_the_extra(tmp_path, capsys, monkeypatch):
    # wrong: an ImportError other than ModuleNotFoundError from `import matplotlib` escapes as a traceback
    a, b = _simple(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenMatplotlib(), *sys.meta_path])
    rc = main(["diff", a, b, "--plot", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fvtransform[plot]" in err


# 9
def test_plot_size_is_bounded_with_many_blocks(tmp_path, capsys):
    # wrong: the picture grows 26 px per block without limit (20 000 blocks: 600 x 520 220 px, 8.7 GB, 49 s)
    a = {f"blocks.{i}.attn1.to_q.weight": torch.ones(1) for i in range(400)}
    b = {k: v * 2 for k, v in a.items()}
    pa, pb = _pair(tmp_path, a, b)
    out = tmp_path / "many.png"
    assert main(["diff", pa, pb, "--plot", str(out)]) == 0
    w, h = _png_size(out)
    assert w <= 8192 and h <= 8192, (w, h)


# 10
def test_plot_path_with_control_characters_is_printed_escaped(tmp_path, capsys):
    # wrong: the `plot: ...` line prints the raw name, so a newline splits it and escape codes reach the terminal
    a, b = _simple(tmp_path)
    out = tmp_path / "we\nird\x1b[31m.png"
    rc = main(["diff", a, b, "--plot", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text
    assert not any(line == "ird\x1b[31m.png" or line.startswith("ird") for line in text.splitlines())


# 11
def test_changed_zero_weights_are_not_drawn_blank(tmp_path, capsys):
    # wrong: a base weight of zeros that the update changes has ratio inf and is drawn blank, pixel for pixel as untouched
    import matplotlib.image

    z = {"blocks.0.attn1.to_q.weight": torch.zeros(4, 4), "blocks.1.attn1.to_q.weight": torch.zeros(4, 4)}
    pictures = []
    for name, after in (("changed", torch.ones(4, 4)), ("same", torch.zeros(4, 4))):
        d = tmp_path / name
        d.mkdir()
        b = dict(z, **{"blocks.0.attn1.to_q.weight": after})
        pa, pb = _pair(d, z, b)
        assert main(["diff", pa, pb, "--plot", str(d / "x.png")]) == 0
        pictures.append(matplotlib.image.imread(str(d / "x.png")))
    assert pictures[0].shape != pictures[1].shape or (pictures[0] != pictures[1]).any()
