"""The docs site as a user sees it: built, served on 127.0.0.1, every page opened in headless Chromium.

A page fails on a console error or an uncaught exception, a request that fails or leaves 127.0.0.1 (fonts,
CDNs: the site must work offline), a response of 400 or more, a broken internal link (page or anchor) or
image, a mermaid diagram left as source instead of drawn, or an empty main content. Screenshots of the home
page, a guide and the benchmarks page are saved to a temporary folder, printed at the end (``pytest -s``).

The browser is Debian's ``chromium`` (``apt-get install -y chromium``; scripts/fresh_check.sh installs it
when it runs as root), driven by playwright from the test extra (never ``playwright install``: no browser
download). Without chromium the test fails and says how to install it; ``FVT_SKIP_BROWSER=1`` skips it
instead (for a developer without root; CI never sets it).
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
from pathlib import Path
import re
import subprocess
import sys
import threading
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("FVT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ("install it with `apt-get install -y chromium` (as root; scripts/fresh_check.sh does it in CI) and "
           "the test extra (`pip install -e '.[test]'`, for playwright); or set FVT_SKIP_BROWSER=1 to skip this test")
#: Pages photographed, by their path in the site.
SCREENSHOTS = {"home": "", "guide-lora": "guides/lora/", "benchmarks": "benchmarks/"}


def _browser_or_fail() -> None:
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"no Chromium at {CHROMIUM}")
    try:
        import playwright  # noqa: F401
    except ModuleNotFoundError:
        missing.append("no playwright (the test extra)")
    if not missing:
        return
    if os.environ.get("FVT_SKIP_BROWSER") == "1":
        pytest.skip("; ".join(missing) + " (FVT_SKIP_BROWSER=1)")
    pytest.fail("the browser test needs a browser: " + "; ".join(missing) + f"; {INSTALL}", pytrace=False)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


class _Ids(html.parser.HTMLParser):
    """Every ``id`` of a page (the anchors a link may name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(v for k, v in attrs if k in ("id", "name") and v)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The docs site, built strictly (the browser's needs are checked first)."""
    _browser_or_fail()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def server(site: Path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


#: Run in the page once it has loaded: what a reader would see, as plain data.
_INSPECT = """() => {
  const main = document.querySelector('article.md-content__inner') || document.querySelector('main');
  const text = main ? main.innerText.trim() : '';
  const title = main && main.querySelector('h1') ? main.querySelector('h1').innerText.trim() : '';
  return {
    text: text.length - title.length,
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    images: [...document.querySelectorAll('img')].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    rawMermaid: [...document.querySelectorAll('pre.mermaid, pre > code')]
        .filter(e => e.matches('pre.mermaid') || /^\\s*(graph|flowchart)\\s+(LR|TD|TB|RL|BT)\\b/.test(e.textContent))
        .map(e => e.textContent.slice(0, 60)),
    diagrams: [...document.querySelectorAll('div.mermaid')].map(d => d.getBoundingClientRect().height),
    footer: (document.querySelector('.md-copyright') || {}).innerText || '',
  };
}"""


def _pages(site: Path) -> list[str]:
    pages = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    return ["" if p == "." else p + "/" for p in pages]


def _visit(site: Path, server: str, profile: Path, shots: Path | None = None,
           draw_ms: int = 15000) -> tuple[list[str], dict[str, dict]]:
    """Open every page of ``site`` (served at ``server``) in Chromium: ``(problems, what each page shows)``.

    A page with a diagram gets up to ``draw_ms`` for the theme to draw it.
    """
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    seen: dict[str, dict] = {}
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            current = {"url": ""}

            def outside(route) -> None:
                problems.append(f"{current['url']}: a request leaves the site: {route.request.url}")
                route.abort()

            context.route(re.compile(r"^(?!" + re.escape(server) + ").*"), outside)
            page.on("console", lambda m: m.type == "error" and problems.append(f"{current['url']}: console error: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"{current['url']}: uncaught exception: {e}"))
            page.on("requestfailed", lambda r: r.url.startswith(server) and problems.append(
                f"{current['url']}: request failed: {r.url} ({r.failure})"))
            page.on("response", lambda r: r.status >= 400 and problems.append(
                f"{current['url']}: HTTP {r.status} for {r.url}"))
            for rel in _pages(site):
                current["url"] = server + rel
                page.goto(server + rel, wait_until="load")
                source = (site / rel / "index.html").read_text(encoding="utf-8")
                if 'class="mermaid"' in source:  # drawn asynchronously by the theme; wait for every diagram
                    try:
                        page.wait_for_function("document.querySelectorAll('pre.mermaid').length === 0", timeout=draw_ms)
                    except Exception:  # the inspection below names the diagram left undrawn
                        pass
                seen[rel] = info = page.evaluate(_INSPECT)
                if info["text"] < 40:
                    problems.append(f"{rel or 'home'}: the main content is empty ({info['text']} characters)")
                problems += [f"{rel or 'home'}: mermaid source shown instead of a diagram: {m!r}" for m in info["rawMermaid"]]
                problems += [f"{rel or 'home'}: a diagram drawn {h:.0f} px high" for h in info["diagrams"] if h < 40]
                problems += [f"{rel or 'home'}: broken image {i['src']}" for i in info["images"] if not i["ok"]]
                for name, where in SCREENSHOTS.items():
                    if shots is not None and where == rel:
                        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        finally:
            context.close()
    # internal links: the page exists, and so does the anchor it names
    ids: dict[Path, set[str]] = {}
    for rel, info in seen.items():
        for link in info["links"]:
            if not link.startswith(server):
                continue
            target, _, anchor = link[len(server):].partition("#")
            target = urlsplit(urljoin(server, target)).path.lstrip("/")
            path = site / unquote(target)
            if path.is_dir():
                path = path / "index.html"
            if not path.is_file():
                problems.append(f"{rel or 'home'}: a link to a missing page: {link}")
                continue
            if anchor and path.suffix == ".html":
                if path not in ids:
                    parser = _Ids()
                    parser.feed(path.read_text(encoding="utf-8"))
                    ids[path] = parser.ids
                if unquote(anchor) not in ids[path]:
                    problems.append(f"{rel or 'home'}: a link to a missing anchor: {link}")
    return sorted(set(problems)), seen


def test_every_page_renders_in_a_browser(site: Path, server: str, tmp_path_factory) -> None:
    assert {"", "guides/lora/", "benchmarks/", "api/"} <= set(_pages(site))
    shots = tmp_path_factory.mktemp("screenshots")
    problems, seen = _visit(site, server, tmp_path_factory.mktemp("chromium-profile"), shots)
    assert not problems, "\n".join(problems)
    # what the pages must show: the drawn diagrams, the version, the pictures
    assert len(seen[""]["diagrams"]) >= 1, "the home page shows no drawn diagram"
    assert len(seen["concepts/"]["diagrams"]) >= 1, "the concepts page shows no drawn diagram of the LoRA formats"
    assert any(i["src"].endswith("/img/lora-update-norms.png") for i in seen["guides/lora/"]["images"])
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert version in seen[""]["footer"], f"the footer shows no version {version}: {seen['']['footer']!r}"
    assert any(i["src"].endswith(".png") for i in seen["benchmarks/"]["images"])
    for name in SCREENSHOTS:
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
    print(f"\nscreenshots of the docs site: {shots}")


_MAIN = '<article class="md-content__inner"><h1>{title}</h1>{body}</article>'
#: A site with one defect per page, and the problem each must raise.
_BROKEN = {
    "": ('<p>A home page with enough words to count as content, linking <a href="gone/">a page that is not there</a> '
         'and <a href="ok/#nowhere">an anchor that is not there</a>.</p>', ["a link to a missing page", "a link to a missing anchor"]),
    "ok/": ('<p id="here">A fine page: enough words to count as content, nothing broken at all here.</p>', []),
    "image/": ('<p>A page with enough words to count as content and a picture that is missing.</p><img src="../nothing.png">',
               ["broken image", "HTTP 404"]),
    "console/": ("<p>A page with enough words to count as content and a script that logs an error.</p>"
                 "<script>console.error('boom')</script>", ["console error: boom"]),
    "mermaid/": ('<p>A page with enough words to count as content and an undrawn diagram.</p>'
                 '<pre class="mermaid"><code>graph LR\n a --> b</code></pre>', ["mermaid source shown instead of a diagram"]),
    "empty/": ("", ["the main content is empty"]),
    "outside/": ('<p>A page with enough words to count as content and a font from the network.</p>'
                 '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">', ["a request leaves the site"]),
}


def test_the_browser_check_finds_each_kind_of_defect(tmp_path) -> None:
    """The checks can fail: a hand-made site with one defect per page raises each problem, on its page only."""
    _browser_or_fail()
    site = tmp_path / "site"
    for rel, (body, _) in _BROKEN.items():
        (site / rel).mkdir(parents=True, exist_ok=True)
        (site / rel / "index.html").write_text(f"<!doctype html><html><body>{_MAIN.format(title='T', body=body)}</body></html>")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        problems, _ = _visit(site, server, tmp_path / "profile", draw_ms=500)
    finally:
        httpd.shutdown()
        httpd.server_close()
    for rel, (_, wanted) in _BROKEN.items():
        mine = [p for p in problems if p.startswith((f"{rel or 'home'}:", f"{server}{rel}:"))]
        for want in wanted:
            assert any(want in p for p in mine), f"{rel or 'home'}: no {want!r} in {mine}"
        if not wanted:
            assert not mine, mine


def test_without_chromium_the_test_fails_and_says_how_to_install(monkeypatch) -> None:
    """A developer without the browser learns what to install; FVT_SKIP_BROWSER=1 turns the failure into a skip."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("FVT_SKIP_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"no Chromium at /nonexistent/chromium; .*apt-get install -y chromium"):
        _browser_or_fail()
    monkeypatch.setenv("FVT_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="FVT_SKIP_BROWSER=1"):
        _browser_or_fail()


def test_fresh_check_installs_chromium_when_root_and_fetches_mermaid() -> None:
    """CI (scripts/fresh_check.sh, run by .ci/run) installs the browser this test needs, and the diagrams' script."""
    script = (ROOT / "scripts" / "fresh_check.sh").read_text()
    assert re.search(r'\[ ! -x /usr/bin/chromium \] && \[ "\$\(id -u\)" -eq 0 \]', script)
    assert "apt-get install -y chromium chromium-driver" in script and not re.search(r"^\s*(export\s+)?FVT_SKIP_BROWSER=", script, re.M)
    assert "python3 scripts/docs_hooks.py fetch" in script
