import json
import os
import subprocess
import sys

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, KeyMismatchError, NotFoundError, ShapeMismatchError, UnsafeFileError, UsageError, WriteError

from _helpers import assert_unchanged, snapshot


def mixed_tree():
    return fvt.ParamTree({
        "z.weight": torch.randn(3, 5),
        "a.half": torch.randn(4).half(),
        "a.bf": torch.randn(2, 2).bfloat16(),
        "ids": torch.arange(7, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    })


def test_single_file_round_trip_keeps_order_and_dtypes(tmp_path):
    t = mixed_tree()
    snap = snapshot(t)
    fvt.save(t, tmp_path / "m.safetensors", metadata={"note": "x"})
    back = fvt.load(tmp_path / "m.safetensors")
    assert back == t and back.same_order(t)
    assert_unchanged(t, snap)
    from safetensors.torch import load_file

    other = load_file(tmp_path / "m.safetensors")
    assert set(other) == set(t) and all(fvt.tensors_equal(other[k], t[k]) for k in t)


def test_sharded_round_trip_and_index_layout(tmp_path):
    t = mixed_tree()
    fvt.save(t, tmp_path / "ck", max_shard_size=64)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    assert set(index["weight_map"]) == set(t)
    assert len(set(index["weight_map"].values())) > 1
    back = fvt.load(tmp_path / "ck")
    assert back == t and back.same_order(t)
    assert fvt.load(tmp_path / "ck" / "model.safetensors.index.json") == t


def test_resave_replaces_shard_set_and_keeps_other_files(tmp_path):
    folder = tmp_path / "ck"
    fvt.save(mixed_tree(), folder, max_shard_size=32)
    (folder / "config.json").write_text("{}")
    small = fvt.ParamTree({"only": torch.ones(2)})
    fvt.save(small, folder, max_shard_size=32)
    names = sorted(os.listdir(folder))
    assert names == ["config.json", "model.safetensors"]
    assert fvt.load(folder) == small
    assert not [p for p in os.listdir(tmp_path) if "fvt-tmp" in p]


def test_tied_tensors_saved_once_and_restored_as_aliases(tmp_path):
    w = torch.randn(4, 4)
    t = fvt.ParamTree({"emb.weight": w, "x": torch.ones(1), "head.weight": w})
    fvt.save(t, tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert set(f.keys()) == {"emb.weight", "x"}
    back = fvt.load(tmp_path / "t.safetensors")
    assert back.aliases() == (("emb.weight", "head.weight"),) and back.same_order(t)
    fvt.save(t, tmp_path / "sh", max_shard_size=40)
    back = fvt.load(tmp_path / "sh")
    assert back.aliases() == (("emb.weight", "head.weight"),) and back == t


def test_load_options(tmp_path):
    t = mixed_tree()
    fvt.save(t, tmp_path / "m.safetensors")
    s = fvt.load(tmp_path / "m.safetensors", select="a.*")
    assert list(s) == ["a.half", "a.bf"]
    c = fvt.load(tmp_path / "m.safetensors", dtype=torch.float32)
    assert c["a.half"].dtype == torch.float32 and c["ids"].dtype == torch.int32
    r = fvt.load(tmp_path / "m.safetensors", rename={"ids": "position_ids"})
    assert "position_ids" in r
    with pytest.raises(KeyMismatchError, match="matched no key"):
        fvt.load(tmp_path / "m.safetensors", select="nothing*")
    with pytest.raises(UsageError, match="plan= needs mesh="):
        fvt.load(tmp_path / "m.safetensors", plan="fsdp")
    with pytest.raises(fvt.errors.UsageError, match="mesh must be a torch.distributed DeviceMesh"):
        fvt.load(tmp_path / "m.safetensors", mesh=object())


def test_loaded_tensors_never_write_through_to_the_file(tmp_path):
    t = fvt.ParamTree({"w": torch.zeros(1000)})
    fvt.save(t, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    loaded = fvt.load(tmp_path / "m.safetensors")
    loaded["w"].add_(1)  # a caller misbehaving on its own copy
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert fvt.load(tmp_path / "m.safetensors")["w"].sum() == 0


def test_folder_resolution(tmp_path):
    t = fvt.ParamTree({"w": torch.ones(2)})
    (tmp_path / "a").mkdir()
    fvt.save(t, tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    fvt.save(fvt.ParamTree({"other": torch.ones(1)}), tmp_path / "a" / "something_else.safetensors")
    assert list(fvt.load(tmp_path / "a")) == ["w"]
    (tmp_path / "b").mkdir()
    fvt.save(t, tmp_path / "b" / "x.safetensors")
    fvt.save(t, tmp_path / "b" / "y.safetensors")
    with pytest.raises(UsageError, match=r"several unrelated safetensors files and no index: .*; pass the file to load, e.g. fvt.load\("):
        fvt.load(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(NotFoundError, match="no weights found"):
        fvt.load(tmp_path / "c")
    with pytest.raises(NotFoundError, match="no such file"):
        fvt.load(tmp_path / "nope")


def test_index_errors(tmp_path):
    t = fvt.ParamTree({"a": torch.ones(4), "b": torch.ones(4)})
    folder = tmp_path / "ck"
    fvt.save(t, folder, max_shard_size=16)
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    (folder / "model-00002-of-00002.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(NotFoundError, match="missing"):
        fvt.load(folder)
    (tmp_path / "moved.safetensors").rename(folder / "model-00002-of-00002.safetensors")
    raw = index.read_text().replace('"weight_map": {', '"weight_map": {"a": "model-00001-of-00002.safetensors", ', 1)
    index.write_text(raw)
    with pytest.raises(KeyMismatchError, match="listed twice"):
        fvt.load(folder)
    doc2 = dict(doc, weight_map={**doc["weight_map"], "a": "../escape.safetensors"})
    index.write_text(json.dumps(doc2))
    with pytest.raises(UnsafeFileError, match="not a plain file name"):
        fvt.load(folder)
    fvt.save(t, folder / "both.safetensors")
    index.write_text(json.dumps({"weight_map": {"a": "both.safetensors"}}))
    with pytest.raises(KeyMismatchError, match="index does not list"):
        fvt.load(folder)
    doc4 = dict(doc, weight_map={"a": doc["weight_map"]["b"], "b": doc["weight_map"]["b"]})
    index.write_text(json.dumps(doc4))
    with pytest.raises(KeyMismatchError, match="does not hold it"):
        fvt.load(folder)


def test_pickles_refused_unless_allowed(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        fvt.load(tmp_path)
    assert torch.equal(fvt.load(tmp_path, allow_pickle=True)["w"], torch.ones(3))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="refused"):
        fvt.load(tmp_path / "evil.pt", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_save_errors(tmp_path):
    with pytest.raises(UsageError, match="meta device"):
        fvt.save({"w": torch.zeros(2, device="meta")}, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    with pytest.raises(WriteError, match="is a folder"):
        fvt.save({"w": torch.zeros(2)}, tmp_path)
    with pytest.raises(UsageError, match="not a size"):
        fvt.save({"w": torch.zeros(2)}, tmp_path / "x", max_shard_size="lots")
    with pytest.raises(UsageError, match="mapping"):
        fvt.save([1], tmp_path / "x.safetensors")


def test_check_reports_everything(model, tree):
    assert fvt.check(tree, model).ok
    bad = fvt.update(fvt.drop(tree, "proj_out.bias"), {"extra": torch.zeros(1)}, allow_new=True)
    bad = fvt.update(bad, {"proj_out.weight": torch.zeros(2, 2)})
    with pytest.raises(ShapeMismatchError, match="shape of 'proj_out.weight'") as info:
        fvt.check(bad, model, strict=False)  # strict concerns keys; a shape mismatch always raises
    report = info.value.report
    assert report.missing == ("proj_out.bias",) and report.unexpected == ("extra",)
    assert report.shape_mismatches[0][0] == "proj_out.weight"
    with pytest.raises(KeyMismatchError, match="missing"):
        fvt.check(bad, model)
    with pytest.raises(ShapeMismatchError, match="shape of 'proj_out.weight'"):
        fvt.check(fvt.update(tree, {"proj_out.weight": torch.zeros(2, 2)}), model)
    with pytest.raises(ShapeMismatchError, match="dtype of") as info:
        fvt.check(fvt.cast(tree, torch.float16), tree, strict=False, dtypes=True)
    assert info.value.report.dtype_mismatches and not info.value.report.shape_mismatches
    assert fvt.check(fvt.drop(tree, "proj_out.bias"), model, strict=False).missing == ("proj_out.bias",)


def test_load_model_reference_folder_and_pipeline(tmp_path, model, tree, inputs):
    comp = tmp_path / "pipe" / "transformer"
    comp.mkdir(parents=True)
    (comp / "config.json").write_text(json.dumps(model.config.to_dict()))
    fvt.save(tree, comp / "diffusion_pytorch_model.safetensors")
    (tmp_path / "pipe" / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "transformer": ["fvtransform", "VideoDiT"], "vae": [None, None]})
    )
    m, t = fvt.load_model(tmp_path / "pipe", component="transformer")
    assert torch.equal(fvt.call(m, t, *inputs), fvt.call(model, tree, *inputs))
    with pytest.raises(UsageError, match=r"choose a component: component= one of \['transformer'\]"):
        fvt.load_model(tmp_path / "pipe")
    with pytest.raises(NotFoundError, match="absent"):
        fvt.load_model(tmp_path / "pipe", component="vae")
    with pytest.raises(NotFoundError, match="no component 'unet'"):
        fvt.load_model(tmp_path / "pipe", component="unet")
    fvt.save(fvt.drop(tree, "proj_out.bias"), comp / "diffusion_pytorch_model.safetensors")
    with pytest.raises(KeyMismatchError, match="proj_out.bias"):
        fvt.load_model(comp)
    assert fvt.load_model(comp, strict=False).report.missing == ("proj_out.bias",)  # listed, not warned about
    (comp / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        fvt.load_model(comp)


LAZY_SCRIPT = r"""
import sys, psutil, torch, fvtransform as fvt
path = sys.argv[1]
proc = psutil.Process()
base = proc.memory_info().rss
tree = fvt.load(path, select="small")
x = tree["small"].sum().item()
grow = proc.memory_info().rss - base
print(grow)
"""


def test_selecting_one_tensor_does_not_read_the_others(tmp_path):
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
    fvt.save({"big": big, "small": torch.ones(10)}, tmp_path / "m.safetensors")
    del big
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") if os.access("/proc/sys/vm/drop_caches", os.W_OK) else open(os.devnull, "w") as f:
        try:
            f.write("1")
        except OSError:
            pass
    out = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(tmp_path / "m.safetensors")], capture_output=True, text=True, check=True)
    grow = int(out.stdout.strip().splitlines()[-1])
    assert grow < 16 * 1024 * 1024, f"resident memory grew by {grow} bytes"


# ----------------------------------------------------------------------------- the untrusted-file helper
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc/passwd", "a\x00b", 5, None])
def test_contained_refuses_names_that_are_not_plain(tmp_path, name):
    from fvtransform.io._open import contained

    with pytest.raises(UnsafeFileError, match=r"idx\.json: shard name .* is not a plain file name"):
        contained(tmp_path, name, "shard", tmp_path / "idx.json")


def test_json_files_are_read_with_a_size_cap_and_must_be_utf8(tmp_path):
    from fvtransform._json import JsonLimits, read_json_file
    from fvtransform.io._open import read_bytes

    big = tmp_path / "big.json"
    big.write_bytes(b"1" * 100)
    with pytest.raises(FormatError, match=r"big\.json: the config is 100 bytes, over the 64-byte limit"):
        read_bytes(big, "config", limit=64)
    with pytest.raises(FormatError, match=r"big\.json: the config is 100 bytes, over the 64-byte limit"):
        read_json_file(big, limits=JsonLimits(max_bytes=64), what="config")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FormatError, match=r"bad\.json: not valid UTF-8 at byte 7; JSON files are UTF-8"):
        read_json_file(bad, what="config")
    assert read_bytes(big, "config", limit=100) == b"1" * 100


def test_a_loaded_tree_survives_the_file_being_replaced_by_a_save(tmp_path):
    """Guarantee: fvt.load maps at load time and saves replace by rename, so a loaded tree keeps its values."""
    path = tmp_path / "m.safetensors"
    fvt.save(fvt.ParamTree({"w": torch.full((1024,), 1.0)}), path)
    tree = fvt.load(path)
    fvt.save(fvt.ParamTree({"w": torch.full((1024,), 2.0)}), path)
    assert tree["w"].eq(1.0).all() and fvt.load(path)["w"].eq(2.0).all()
