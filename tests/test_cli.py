import json
import subprocess
import sys

import torch

import fvtransform as fvt


def run(*args):
    return subprocess.run([sys.executable, "-m", "fvtransform", *args], capture_output=True, text=True, timeout=120)


def test_demo_passes(tmp_path):
    out = run("demo", "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "all checks passed" in out.stdout and "[FAIL]" not in out.stdout
    assert (tmp_path / "merged.safetensors").is_file()


def test_demo_json(tmp_path):
    out = run("--json", "demo", "--workdir", str(tmp_path))
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and len(doc["steps"]) == 7


def test_inspect_and_errors(tmp_path):
    fvt.save({"a.w": torch.zeros(2, 3, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    out = run("--json", "inspect", str(tmp_path / "m.safetensors"))
    assert json.loads(out.stdout)["tensors"] == [{"key": "a.w", "shape": [2, 3], "dtype": "bfloat16", "bytes": 12}]
    text = run("inspect", str(tmp_path / "m.safetensors")).stdout
    assert "a.w" in text and "1 tensors" in text
    bad = run("inspect", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.startswith("fvtransform: error:") and "Traceback" not in bad.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
    bad = run("inspect", str(tmp_path / "junk.safetensors"))
    assert bad.returncode == 2 and "too short" in bad.stderr
