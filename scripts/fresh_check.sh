#!/usr/bin/env bash
# A first contact, as a new user would make it: a new virtual environment, the project installed exactly as
# README.md says, the main job (`fvtransform demo`), then the README's test command, then the type checker
# (mypy, from the test extra, configured by pyproject.toml's [tool.mypy]), which runs even when the tests
# fail. Exits non-zero on any failure (pytest's "no tests collected", exit 5, included). CI runs it
# (.ci/run); so can a developer.
#
#   scripts/fresh_check.sh             # demo, the whole test suite, the type check
#   scripts/fresh_check.sh --demo-only # the install and the demo only
#
# The browser test (tests/test_browser.py) drives Debian's Chromium: when /usr/bin/chromium is missing and the
# script runs as root with apt-get, it installs chromium and chromium-driver first (a developer without root
# installs them by hand, or sets FVT_SKIP_BROWSER=1; CI never does). The docs' diagram script (mermaid, a
# pinned npm release checked by its hash) is fetched once into a cache by scripts/docs_hooks.py.
#
# The commands are read from README.md: the one-line ```bash block after each `<!-- fresh-check: NAME -->`
# marker (demo, test), so the README cannot drift from what is checked. The virtual environment lives in a
# new temporary folder (FVT_FRESH_DIR overrides its parent) and is removed at the end; pip's download cache
# keeps the installs fast. PYTHON picks the interpreter (default python3, 3.10 or newer). Needs no stdin.
set -euo pipefail

demo_only=0
for arg in "$@"; do
  case "$arg" in
    --demo-only) demo_only=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "fresh_check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "fresh_check: '$python' is not a Python 3.10 or newer; set PYTHON=/path/to/python3" >&2
  exit 2
fi

# The command of the one-line ```bash block after <!-- fresh-check: NAME --> in README.md.
readme_command() {
  "$python" - "$root/README.md" "$1" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
m = re.search(r"<!-- fresh-check: %s -->\s*```bash\n(.*?)\n```" % re.escape(sys.argv[2]), text, re.S)
if not m or "\n" in m.group(1).strip():
    sys.exit(f"fresh_check: README.md has no one-line ```bash block after <!-- fresh-check: {sys.argv[2]} -->")
print(m.group(1).strip())
PY
}
demo_cmd=$(readme_command demo)
test_cmd=$(readme_command test)

if [ "$demo_only" -eq 0 ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "== fresh_check: installing chromium (apt-get) for tests/test_browser.py"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >/dev/null
  apt-get install -y chromium chromium-driver </dev/null >/dev/null
fi

parent=${FVT_FRESH_DIR:-${TMPDIR:-/tmp}}
mkdir -p "$parent"
work=$(mktemp -d "$parent/fvt-fresh.XXXXXX")
trap 'rm -rf "$work"' EXIT

start=$SECONDS
step() {  # step NAME COMMAND: run COMMAND in the repository root with bash, timed
  local name=$1 cmd=$2 t0=$SECONDS rc=0
  echo "== fresh_check: $name: $cmd"
  (cd "$root" && bash -eo pipefail -c "$cmd") </dev/null || rc=$?
  echo "== fresh_check: $name: exit $rc after $((SECONDS - t0)) s"
  return "$rc"
}

echo "== fresh_check: new virtual environment in $work/venv ($("$python" --version 2>&1))"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
hash -r
[ "$(command -v python3)" = "$work/venv/bin/python3" ] || { echo "fresh_check: the venv's python3 is not first on PATH" >&2; exit 1; }

step demo "$demo_cmd"
if [ "$demo_only" -eq 1 ]; then
  echo "== fresh_check: demo passed in $((SECONDS - start)) s"
  exit 0
fi
step docs-assets "python3 scripts/docs_hooks.py fetch"
rc=0
step test "$test_cmd" || rc=$?
# The type check always runs (its errors are reported even when a test fails); its cache stays in $work.
typecheck_rc=0
step typecheck "python3 -m mypy --cache-dir '$work/mypy-cache'" || typecheck_rc=$?
if [ "$rc" -eq 5 ]; then
  echo "fresh_check: pytest collected no tests (exit 5): that is a failure" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "fresh_check: the test command failed (exit $rc)" >&2
  exit "$rc"
fi
if [ "$typecheck_rc" -ne 0 ]; then
  echo "fresh_check: the type check (mypy) failed (exit $typecheck_rc)" >&2
  exit "$typecheck_rc"
fi
echo "== fresh_check: demo, tests and type check passed in $((SECONDS - start)) s"
