#!/usr/bin/env bash
# The test suite: notebooks clean and in sync with memssl/, every notebook's tests
# (nbdev_test), then pytest (loaders, papermill runs, the book in a real browser).
# Run scripts/setup.sh first (CI's .ci/run does both).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0
B=.venv/bin
[ -x $B/nbdev_test ] || { echo "test: no .venv; run bash scripts/setup.sh first" >&2; exit 2; }

echo "== notebooks clean and library in sync"
sum() { cat nbs/*.ipynb experiments/*.ipynb book/*.ipynb intro.ipynb memssl/*.py | md5sum; }
before=$(sum)
$B/nbdev_clean >/dev/null
for f in experiments/*.ipynb book/*.ipynb intro.ipynb; do $B/nbdev_clean --fname "$f" >/dev/null; done
$B/nbdev_export
after=$(sum)
if [ "$before" != "$after" ]; then
  git status --short nbs experiments book intro.ipynb memssl >&2 || true
  echo "test: notebooks were not clean or memssl/ was out of date with nbs/ (run nbdev_clean and nbdev_export, then commit)" >&2
  exit 1
fi

echo "== nbdev_test (flags: ${NBDEV_FLAGS:-slow})"
$B/nbdev_test --flags "${NBDEV_FLAGS:-slow}" --n_workers 2

echo "== pytest"
$B/python -m pytest -q -p no:cacheprovider tests "$@"
