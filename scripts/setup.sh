#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with everything it needs. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: on this workplace's machines the wheels lie on disk.
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q -e '.[service,dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# Headless Chromium and its driver for the browser test of /docs and /redoc (tests/unit/test_docs_offline.py).
# Debian's packages, so nothing downloads a browser build of its own. If this cannot install them (no apt,
# not root), setup goes on and that test fails naming what is missing.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "setup: installing chromium and chromium-driver failed; the browser test will fail" >&2
  else
    echo "setup: chromium/chromedriver missing and apt-get as root unavailable; the browser test will fail" >&2
  fi
fi
# The dashboard's chart library (uPlot), pinned by ui/package-lock.json and served by the API from
# ui/node_modules: no CDN, works offline. `npm ci` again only when the lock file changed.
if command -v npm >/dev/null; then
  lockstamp=ui/node_modules/.installed-$(sha256sum ui/package-lock.json | cut -c1-16)
  if [ ! -f "$lockstamp" ]; then
    (cd ui && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
      && touch "$lockstamp" \
      || echo "setup: npm ci in ui/ failed; the dashboard's charts will not load" >&2
  fi
else
  echo "setup: npm missing (Node.js 20+): the dashboard's charts will not load" >&2
fi
