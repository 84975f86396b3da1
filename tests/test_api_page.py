"""docs/api.md lists every public name once, with its one meaning, and is generated from the package."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
import re
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("api_index", ROOT / "scripts" / "api_index.py")
assert _spec is not None and _spec.loader is not None
api_index = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api_index)


def test_the_api_page_and_reference_pages_are_current():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_index.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"stale: {out.stdout.split()}; run `python scripts/api_index.py` and commit the pages"


def test_every_public_object_is_on_the_page_exactly_once():
    from test_public_api import PUBLIC

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| \[`fvt\.([\w.]+)`\]", page, flags=re.M)
    assert len(listed) == len(set(listed)), "a name is listed twice"
    objects = {}
    for mod_name, names in PUBLIC.items():
        if mod_name in api_index.SKIPPED:
            continue
        module = importlib.import_module("fvtransform" + (f".{mod_name}" if mod_name else ""))
        for name in names:
            obj = getattr(module, name)
            if not (isinstance(obj, type(sys)) or name.startswith("__")):
                objects.setdefault(id(obj), []).append(f"{mod_name + '.' if mod_name else ''}{name}")
    on_page = {id(eval("fvt." + n, {"fvt": importlib.import_module("fvtransform")})) for n in listed}
    missing = [paths for key, paths in objects.items() if key not in on_page]
    assert not missing, f"public but not on docs/api.md: {missing}"
    aliases = re.findall(r"^\| \[`fvt\.([\w.]+)`\].*\| the same function as `fvt\.([\w.]+)`", page, flags=re.M)
    assert sorted(a for a, _ in aliases) == ["shard", "unshard"], "only the lazy distributed names have alias rows"
    assert len(on_page) == len(listed) - len(aliases), "two names on the page are one object"
    assert all(re.search(r"\| [^|]{8,} \|$", line) for line in page.splitlines() if line.startswith("| [`")), \
        "every name has a meaning"
