"""Packaging: the library works in an environment that has only its declared dependencies.

torch does not require numpy, so a fresh virtual environment may lack it; every import of the package and
of the test suites must be declared in pyproject.toml (the tests' own in the ``test`` extra).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
import re
import subprocess
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# Blocks numpy before torch is imported: ``Tensor.numpy()`` then raises "Numpy is not available",
# as in a fresh virtual environment where nothing pulled numpy in.
_NO_NUMPY = """
import sys
sys.modules["numpy"] = None
import warnings
warnings.simplefilter("ignore")
import torch
try:
    torch.zeros(1).numpy()
except RuntimeError as e:
    assert "Numpy is not available" in str(e), e
else:
    raise AssertionError("numpy was not blocked")
"""

_SAVE_LOAD_MERGE = _NO_NUMPY + """
import fvtransform as fvt

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
tree = fvt.ParamTree({
    "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
    "b": torch.randn(4, 4, generator=g)[:, 1:3],            # a non-contiguous view
    "c": torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn),
    "d": torch.empty(0, 7),
    "e": torch.tensor(3.5, dtype=torch.float64),
    "f": torch.tensor([True, False, True]),
})
fvt.save(tree, out + "/one.safetensors")
back = fvt.load(out + "/one.safetensors")
assert set(back) == set(tree)
for k in tree:
    assert back[k].dtype == tree[k].dtype and back[k].shape == tree[k].shape, k
    assert torch.equal(back[k].reshape(-1).view(torch.uint8), tree[k].reshape(-1).view(torch.uint8)), k
base = fvt.ParamTree({f"blocks.{i}.proj.weight": torch.randn(16, 32, generator=g) for i in range(4)})
fvt.save(base, out + "/ckpt", max_shard_size="3KB")   # sharded: the path that failed in a fresh venv
assert fvt.load(out + "/ckpt") == base
adapter = fvt.lora.random_adapter(base, targets="blocks.*.proj.weight", rank=2)
merged, record = fvt.lora.merge_with_record(base, adapter)
assert fvt.lora.restore(merged, record) == base
print("ok")
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)


def test_save_load_and_merge_work_without_numpy(tmp_path):
    out = _run(_SAVE_LOAD_MERGE, str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _imported_modules(where: Path) -> set[str]:
    mods: set[str] = set()
    for path in [where] if where.is_file() else where.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods


def _declared(*groups: str) -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for g in groups:
        reqs += meta["optional-dependencies"][g]
    return {re.split(r"[ \[<>=!~;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


# import name -> distribution name, where they differ
_DIST_OF = {"huggingface_hub": "huggingface-hub", "yaml": "pyyaml", "_pytest": "pytest", "lycoris": "lycoris-lora"}
# the project's own modules and the test suites' local helpers
_LOCAL = {"fvtransform", "_corpus", "_fakehub", "_helpers", "strategies", "conftest", "benchmarks"}
# tools the fixture scripts import from a source checkout, not from a package index
_CHECKOUTS = {"comfy"}


def test_every_import_of_the_package_and_the_tests_is_declared():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    package = _imported_modules(ROOT / "fvtransform") - stdlib - _LOCAL
    missing = {m for m in package if _DIST_OF.get(m, m).replace("_", "-") not in _declared("diffusers", "transformers", "peft", "plot")}
    # fvtransform.testing belongs to the test extra (Hypothesis; it raises MissingDependencyError without it)
    missing -= {m for m in _imported_modules(ROOT / "fvtransform" / "testing") if m in _declared("test")}
    assert not missing, f"pyproject.toml: the package imports {sorted(missing)} but does not declare them"
    suites = set()
    fixture_scripts = ROOT / "tests" / "fixtures"  # dev-time scripts that run the real tools (never collected)
    for folder in ("tests", "property_tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if fixture_scripts not in path.parents:
                suites |= _imported_modules(path)
    suites |= _imported_modules(ROOT / "conftest.py")
    fixtures = _imported_modules(fixture_scripts)
    suites -= stdlib | _LOCAL | _local_test_modules()
    missing = {m for m in suites if _DIST_OF.get(m, m).replace("_", "-") not in _declared("test")}
    assert not missing, f"pyproject.toml: the tests import {sorted(missing)} but the 'test' extra lacks them"
    # ComfyUI is not a PyPI distribution: its fixture script imports `comfy` from a checkout named by $COMFYUI
    # (tests/fixtures/fp8_merge/README.md says how it was run)
    tools = fixtures - stdlib - _LOCAL - {"make_fixtures"} - _CHECKOUTS
    missing = {m for m in tools if _DIST_OF.get(m, m).replace("_", "-") not in _declared("test", "fixtures")}
    assert not missing, f"pyproject.toml: tests/fixtures/ scripts import {sorted(missing)} but the 'fixtures' extra lacks them"


def _local_test_modules() -> set[str]:
    return {p.stem for folder in ("tests", "property_tests") for p in (ROOT / folder).glob("*.py")}


def test_tensor_bytes_outlive_the_contiguous_copy_they_were_read_from():
    """The writer's byte view of a non-contiguous tensor keeps its private copy alive (no numpy, no dangling view)."""
    import gc

    import torch

    from fvtransform.io._safetensors import _tensor_bytes

    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 64, generator=g).to(torch.bfloat16)[:, ::2]  # .contiguous() inside makes a copy
    want = t.contiguous().view(torch.uint8).reshape(-1).tolist()
    view = _tensor_bytes(t)
    gc.collect()
    junk = [torch.full((64, 32), 7.0, dtype=torch.bfloat16) for _ in range(64)]  # reuse of freed memory shows
    assert view.nbytes == 64 * 32 * 2 and view.format == "B" and len(junk) == 64
    assert list(view) == want
    assert _tensor_bytes(torch.empty(0, 3)).nbytes == 0
    assert bytes(_tensor_bytes(torch.tensor(1.5))) == bytes(_tensor_bytes(torch.tensor([1.5])))
