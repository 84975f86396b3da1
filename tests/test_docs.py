"""The docs: every code block of README.md and docs/**/*.md runs as written, and the site builds offline.

Conventions for a fenced block (the marker is an HTML comment on the line(s) just before the fence; mkdocs
and GitHub show nothing of it):

- ```` ```python ````: a complete program. It runs in a fresh namespace, in a new empty folder (its cwd).
- ```` ```bash ````: ``fvtransform`` commands, one per line (``# comments`` allowed), run in order in a new
  folder; each must exit 0.
- ``<!-- docs-test: fragment=NAME -->``: the block needs what the test prepares first: ``FRAGMENTS[NAME]``
  (Python, run in the block's folder and namespace, for files, environment or names), then the block.
- ``<!-- docs-test: skip=REASON -->``: not run, for a REASON of ``SKIPS`` only: ``network`` (a Hub repo id)
  or ``install`` (``pip install``). ``<!-- fresh-check: NAME -->`` marks the README's install commands,
  which scripts/fresh_check.sh runs in a new virtual environment: the same as ``skip=install``.
- Any other language (``mermaid``, ``text``, ``json``) is not code and is not run; a fence with no language
  is an error (say what it is).

All blocks run in ONE subprocess (one import of torch), each in its own folder and namespace, with its
environment, ``sys.path`` and cwd restored after it.
"""

from __future__ import annotations

import hashlib
import html.parser
import importlib.util
import io
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import tarfile
import types

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_LANGS = {"python": "python", "py": "python", "bash": "cli", "sh": "cli", "console": "cli"}
TEXT_LANGS = {"mermaid", "text", "json", "toml", "yaml"}
SKIPS = {
    "network": re.compile(r"""["'][\w.-]+/[\w.-]+["']"""),  # a Hub repo id in quotes
    "install": re.compile(r"\bpip install\b"),
}

_CLI_FILES = r'''
import json, shutil
import torch, fvtransform as fvt
from fvtransform.models import init_weights

_tree = fvt.ParamTree(init_weights(fvt.build("fvt-video-dit"), seed=0))
for _name in ("ckpt", "base"):
    fvt.save(_tree, _name, max_shard_size="20KB")
    with open(f"{_name}/config.json", "w") as _f:
        json.dump({"_class_name": "fvt-video-dit"}, _f)
_a = fvt.lora.random_adapter(_tree, targets="blocks.*.attn1.to_*.weight", rank=4, seed=1)
fvt.lora.save(_a, "my_lora.safetensors", format="kohya")
fvt.lora.save(_a, "a.safetensors", format="diffusers")
fvt.lora.save(fvt.lora.random_adapter(_tree, targets="blocks.*.attn2.to_*.weight", rank=2, seed=2), "b", format="peft")
fvt.save(fvt.lora.merge(_tree, fvt.lora.random_adapter(_tree, targets="blocks.*.attn1.to_q.weight", rank=2, seed=3, scale_b=1.0)), "tuned")
'''

_GLOO_ONE_PROCESS = r'''
import os, socket
import fvtransform as fvt
from fvtransform.models import init_weights

with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _port = _s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
fvt.save(fvt.ParamTree(init_weights(fvt.build("fvt-video-dit"), seed=0)), "ckpt", max_shard_size="20KB")
'''

_MY_PACKAGE = r'''
import os, sys
os.makedirs("my_package", exist_ok=True)
open("my_package/__init__.py", "w").close()
with open("my_package/models.py", "w") as _f:
    _f.write(
        "import torch\n"
        "class MyDiT(torch.nn.Module):\n"
        "    def __init__(self, dim: int = 8):\n"
        "        super().__init__()\n"
        "        self.proj = torch.nn.Linear(dim, dim)\n"
    )
sys.path.insert(0, os.getcwd())
'''

#: What a fragment needs before it runs (files, environment), and after (clean-up), by name.
FRAGMENTS: dict[str, tuple[str, str]] = {
    "cli-files": (_CLI_FILES, ""),
    "gloo-one-process": (_GLOO_ONE_PROCESS, "import torch.distributed as _d\nif _d.is_initialized():\n    _d.destroy_process_group()\n"),
    "my-package": (_MY_PACKAGE, "sys.modules.pop('my_package.models', None); sys.modules.pop('my_package', None)\n"),
}

_MARKER = re.compile(r"<!--\s*(docs-test|fresh-check):\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\S*)\s*$")


def _blocks(page: Path, name: str | None = None) -> list[dict]:
    """Every fenced block of a page: where, language, code, and its marker (the comment just above)."""
    name = name or str(page.relative_to(ROOT))
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.search(lines[k]) if k >= 0 else None
        out.append({
            "id": f"{name}:{start + 1}", "lang": lang, "code": "\n".join(lines[start + 1 : j]) + "\n",
            "marker": (marker.group(1), marker.group(2)) if marker else None,
        })
        i = j + 1
    return out


ALL_BLOCKS = [b for page in PAGES for b in _blocks(page)]


def _plan(block: dict) -> tuple[str, str | None]:
    """``("run", fragment or None)``, ``("skip", reason)`` or ``("text", None)``; raises on a misuse."""
    lang, marker = block["lang"], block["marker"]
    if not lang:
        raise AssertionError(f"{block['id']}: a fence without a language; say what it is (```python, ```bash, ```text)")
    if lang in TEXT_LANGS:
        return "text", None
    if lang not in RUN_LANGS:
        raise AssertionError(f"{block['id']}: unknown block language {lang!r}; known: {sorted(RUN_LANGS) + sorted(TEXT_LANGS)}")
    if marker is None:
        return "run", None
    kind, value = marker
    if kind == "fresh-check":
        kind, value = "docs-test", "skip=install"
    key, _, name = value.partition("=")
    if key == "fragment":
        if name not in FRAGMENTS:
            raise AssertionError(f"{block['id']}: fragment {name!r} has no completion in tests/test_docs.py FRAGMENTS")
        return "run", name
    if key == "skip":
        if name not in SKIPS:
            raise AssertionError(f"{block['id']}: skip reason {name!r} is not one of {sorted(SKIPS)}")
        if not SKIPS[name].search(block["code"]):
            raise AssertionError(f"{block['id']}: marked skip={name} but shows no {name} use; run it instead")
        return "skip", name
    raise AssertionError(f"{block['id']}: unknown marker {value!r}; use fragment=NAME or skip=REASON")


_RUNNER = r'''
import contextlib, io, json, os, shlex, sys, tempfile, traceback
jobs = json.load(open(sys.argv[1]))
results = {}
try:  # the guides' property tests: deterministic draws, no health check on a loaded CI machine's slowness
    from hypothesis import HealthCheck, settings
    settings.register_profile("docs", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("docs")
except ImportError:
    pass
for job in jobs:
    folder = tempfile.mkdtemp(prefix="doc-", dir=sys.argv[2])
    cwd, env, path = os.getcwd(), dict(os.environ), list(sys.path)
    out = io.StringIO()
    ns = {"__name__": "__main__"}
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out):
            exec(compile(job["setup"], job["id"] + " (setup)", "exec"), ns)
            try:
                if job["kind"] == "python":
                    exec(compile(job["code"], job["id"], "exec"), ns)
                else:
                    from fvtransform.cli import main
                    for n, line in enumerate(job["code"].splitlines(), 1):
                        argv = shlex.split(line, comments=True)
                        if not argv:
                            continue
                        if argv[0] != "fvtransform":
                            raise AssertionError(f"line {n}: {line!r} is not an fvtransform command")
                        try:
                            rc = main(argv[1:])
                        except SystemExit as e:
                            rc = e.code
                        if rc != 0:
                            raise AssertionError(f"line {n}: {line!r} exited {rc}")
            finally:
                exec(compile(job["teardown"], job["id"] + " (teardown)", "exec"), ns)
        results[job["id"]] = None
    except BaseException:
        results[job["id"]] = traceback.format_exc()[-4000:] + "\n--- output ---\n" + out.getvalue()[-2000:]
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, str | None]:
    """Run every block to be run, in one subprocess; ``{id: None or the error}``."""
    jobs = []
    for b in ALL_BLOCKS:
        what, fragment = _plan(b)
        if what == "run":
            setup, teardown = FRAGMENTS[fragment] if fragment else ("", "")
            jobs.append({"id": b["id"], "kind": RUN_LANGS[b["lang"]], "code": b["code"], "setup": setup, "teardown": teardown})
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp)}  # what a block leaves in a temp folder goes with tmp
    out = subprocess.run([sys.executable, "-c", _RUNNER, str(tmp / "jobs.json"), str(tmp)], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _planned(block: dict) -> str:
    """``_plan``'s verdict for collection: a misused block counts as not run (test_every_block_is_planned fails on it)."""
    try:
        return _plan(block)[0]
    except AssertionError:
        return "misused"


RUN_BLOCKS = [b for b in ALL_BLOCKS if _planned(b) == "run"]


def test_every_block_is_planned():
    """Each block runs, or is text, or is skipped for a known reason it really shows; anything else is named."""
    problems = []
    for block in ALL_BLOCKS:
        try:
            _plan(block)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b["id"] for b in RUN_BLOCKS])
def test_code_block_runs_as_written(block, ran):
    assert block["id"] in ran, f"{block['id']} did not run"
    assert ran[block["id"]] is None, f"{block['id']} failed:\n{ran[block['id']]}"


def test_the_pages_hold_code_blocks_that_run():
    runnable = RUN_BLOCKS
    pages = {b["id"].split(":")[0] for b in runnable}
    assert {"README.md", "docs/concepts.md", "docs/guides/load-and-run.md", "docs/guides/lora.md", "docs/guides/cli.md"} <= pages
    assert sum(b["lang"] == "bash" for b in runnable) >= 1


@pytest.mark.parametrize("text, problem", [
    ("```\nx = 1\n```\n", "without a language"),
    ("```rust\nfn main() {}\n```\n", "unknown block language"),
    ("<!-- docs-test: fragment=nope -->\n```python\nx\n```\n", "has no completion"),
    ("<!-- docs-test: skip=slow -->\n```python\nx\n```\n", "is not one of"),
    ("<!-- docs-test: skip=network -->\n```python\nx = 1\n```\n", "shows no network use"),
    ("<!-- docs-test: run-it -->\n```python\nx = 1\n```\n", "unknown marker"),
])
def test_a_misused_marker_or_fence_is_an_error(tmp_path, text, problem):
    page = tmp_path / "page.md"
    page.write_text(text)
    block = _blocks(page, "page.md")[0]
    with pytest.raises(AssertionError, match=problem):
        _plan(block)


def test_the_readme_commands_of_the_fresh_check_are_marked():
    """scripts/fresh_check.sh reads its two commands from these markers."""
    marked = {b["marker"][1]: b["code"].strip() for b in _blocks(ROOT / "README.md") if b["marker"] and b["marker"][0] == "fresh-check"}
    assert set(marked) == {"demo", "test"}
    assert marked["demo"].endswith("fvtransform demo") and "pytest" in marked["test"]
    assert all(c.startswith("python3 -m pip install -q -c constraints.txt -e ") for c in marked.values())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once (strict: a broken link or a missing page is an error)."""
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr
    return out


def test_docs_build_strict_without_network(site):
    for page in ("index.html", "api/index.html", "benchmarks/index.html", "guides/lora/index.html", "security/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "merge_checkpoint" in api and "ShardPlan" in api and "maybe_download_model" in api
    # every name on the API index links to an entry that the reference pages really render
    links = re.findall(r"\]\((reference/[\w-]+)\.md#([\w.]+)\)", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"))
    assert len(links) > 80
    broken = [f"{ref}#{anchor}" for ref, anchor in links
              if f'id="{anchor}"' not in (site / ref / "index.html").read_text(encoding="utf-8")]
    assert not broken, f"links of docs/api.md to entries the reference pages do not render: {broken}"


def _docs_hooks() -> types.ModuleType:
    """scripts/docs_hooks.py (mkdocs.yml's hooks), loaded from its file."""
    spec = importlib.util.spec_from_file_location("fvt_docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Text(html.parser.HTMLParser):
    """The text a reader sees: no tags, attributes, scripts or styles; entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in ("script", "style") and self._hidden > 0

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


#: Wording for the team, not for users: a work item's number, a goal to meet.
WORK_WORDING = re.compile(r"\bissues?\s*#?\s*\d+|\btargets?\s*(?:<=|>=|<(?!-)|>|=|≤|≥)\s*\d", re.I)


def _work_wording(text: str) -> list[str]:
    return [text[max(0, m.start() - 40): m.end() + 20].replace("\n", " ") for m in WORK_WORDING.finditer(text)]


@pytest.mark.parametrize("text, found", [
    ("Loading a checkpoint (issue 3)", True), ("see Issue #18 for", True), ("(target <= 1.5)", True),
    ("ratio (target ≥ 4)", True), ("largest tensor (26.3 MiB; target < 3)", True),
    ("format, target <- file key", False), ("LoRA targets, ranks", False), ('target="_blank"', False),
])
def test_the_work_wording_check_finds_what_it_should(text, found):
    assert bool(_work_wording(text)) is found


def test_user_pages_speak_no_work_items(site):
    """No built page (guides, reference from docstrings, benchmarks) names an issue number or a goal."""
    problems = []
    for page in sorted(site.rglob("*.html")):
        parser = _Text()
        parser.feed(page.read_text(encoding="utf-8"))
        problems += [f"{page.relative_to(site)}: ...{hit}..." for hit in _work_wording("".join(parser.parts))]
    assert not problems, "pages for users that speak of work items or goals:\n" + "\n".join(problems)


def test_the_site_loads_nothing_from_outside(site):
    """Fonts off, mermaid served by the site (scripts/docs_hooks.py): no script, style or font from the network."""
    docs_hooks = _docs_hooks()
    js = site / docs_hooks.SITE_PATH
    assert hashlib.sha256(js.read_bytes()).hexdigest() == docs_hooks.MERMAID_JS_SHA256
    outside = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)
    found = [f"{p.relative_to(site)}: {m.group(0)[:80]}" for p in site.rglob("*.html")
             for m in outside.finditer(p.read_text(encoding="utf-8"))]
    assert not found, found
    assert 'src="../../js/mermaid.min.js"' in (site / "guides" / "lora" / "index.html").read_text(encoding="utf-8")


def test_a_tampered_mermaid_is_refused(tmp_path, monkeypatch):
    docs_hooks = _docs_hooks()
    monkeypatch.setenv("FVT_DOCS_CACHE", str(tmp_path))
    (tmp_path / f"mermaid-{docs_hooks.MERMAID_VERSION}.min.js").write_text("alert('not mermaid')")
    fetched = []
    monkeypatch.setattr(docs_hooks, "_tarball", lambda: fetched.append(1) or _tgz({"package/dist/mermaid.min.js": b"evil"}))
    with pytest.raises(SystemExit, match=r"package/dist/mermaid.min.js has sha256 .*expected d0830a6c"):
        docs_hooks.mermaid_js()
    assert fetched == [1]  # the tampered cache was not served; a fresh copy was fetched and checked


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_the_lora_format_diagram_names_every_format():
    from fvtransform.lora._format_table import TABLE

    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    diagram = text[text.index("## LoRA files"):]
    diagram = diagram[diagram.index("```mermaid"): diagram.index("```", diagram.index("```mermaid") + 3)]
    read = set(re.findall(r'\w+\["(\S+)<br/>[^"]*"\] --> load$', diagram, flags=re.M))
    written = {name for label in re.findall(r'w_\w+\["([^"]+):', diagram) for name in label.split(", ")}
    assert read == {f.name for f in TABLE}, read
    assert written == {f.name for f in TABLE if f.write_roles}, written


def test_the_benchmark_page_generator_writes_for_users(tmp_path):
    """benchmarks/_report.py: each benchmark says what it measures, the peers, the machine and a takeaway; the
    benchmarks' goals and item letters stay out of the page."""
    from benchmarks._report import ratio_label, write_report

    assert ratio_label("(d)/(e) load_model+call / from_pretrained+call (target <= 1.05)") == "load_model+call / from_pretrained+call"
    doc = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    text = write_report(doc, tmp_path).read_text()
    assert not _work_wording(text), _work_wording(text)
    sections = text.split("\n### ")[1:]
    assert len(sections) == 4
    for section in sections:
        for part in ("- **Measures**: ", "- **Peers**: ", "- **Machine**: 2 cores", "**Takeaway**: "):
            assert part in section, (section[:60], part)
