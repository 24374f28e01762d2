#!/usr/bin/env bash
# Provision the e2e tier's browser, idempotently:
#   - Debian's Chromium at /usr/bin/chromium (apt-get; needs root) when it is missing
#   - the `playwright` Python package in the given venv (default .venv) when it is missing
# Never runs `playwright install`: the tests drive the system Chromium through executable_path,
# so no browser is downloaded. Ends with a smoke test: headless Chromium renders a page.
# Usage: scripts/ci-install-browser.sh [VENV]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-.venv}"
CHROMIUM=/usr/bin/chromium
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no Python at $PY (run make venv first, or pass the venv as the first argument)" >&2; exit 1; }

if [ ! -x "$CHROMIUM" ]; then
  [ "$(id -u)" = 0 ] || { echo "$CHROMIUM is missing and installing it needs root (apt-get install -y chromium)" >&2; exit 1; }
  echo "installing chromium (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/tmp/ci-apt-chromium.log 2>&1 || { tail -30 /tmp/ci-apt-chromium.log; exit 1; }
  apt-get install -y -q chromium >>/tmp/ci-apt-chromium.log 2>&1 || { tail -30 /tmp/ci-apt-chromium.log; exit 1; }
fi

if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "installing playwright into $VENV (the Python package only; no browser download)"
  "$PY" -m pip install -q "playwright>=1.50"
fi

"$PY" - "$CHROMIUM" <<'EOF'
import sys

from playwright.sync_api import sync_playwright

args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run",
        "--disable-component-update", "--disable-sync"]
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=sys.argv[1], args=args, headless=True)
    page = browser.new_page()
    page.set_content("<h1>ok</h1>")
    assert page.inner_text("h1") == "ok"
    print(f"browser ready: {sys.argv[1]} (Chromium {browser.version})")
    browser.close()
EOF
