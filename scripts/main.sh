#!/usr/bin/env bash
# The main job on the embedded default: set up, run the default grid (SimCLR, small CNN,
# Fashion-MNIST, CPU) with papermill, and build the book. Extra arguments go to memssl-grid
# (e.g. --set epochs=20 for a quicker look).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
# The library chapters of the book hold memssl's checks; executing them first (about 3 minutes) stops the job at once,
# naming the chapter and cell, when one fails on this machine, instead of after the long runs. The book build reuses them.
echo "== checking the library (executing the book's library chapters)"
t1=$(date +%s)
if ! .venv/bin/memssl-book . --library; then
  echo "main: a library check failed (above); nothing else was run. 'bash scripts/test.sh' runs every test." >&2
  exit 1
fi
echo "== the library checks took $(( $(date +%s) - t1 )) s"
echo "== running the default grid (experiments/default.yml)"
t1=$(date +%s)
.venv/bin/memssl-grid experiments/default.yml "$@"
echo "== the default run took $(( $(date +%s) - t1 )) s"
echo "== where memorisation lives in the default run's encoders (experiments/layers.yml: LayerMem and UnitMem, nothing trained)"
t1=$(date +%s)
.venv/bin/memssl-grid experiments/layers.yml
echo "== the layers run took $(( $(date +%s) - t1 )) s"
echo "== DejaVu beside SSLMem for the same encoders (experiments/dejavu.yml: corner crops labelled by public neighbours, nothing trained)"
t1=$(date +%s)
.venv/bin/memssl-grid experiments/dejavu.yml
echo "== the dejavu run took $(( $(date +%s) - t1 )) s"
echo "== running the removal demonstration (experiments/removal_demo.yml: the default run's pool ranked by its estimates, 20% removed, retrained and probed)"
t1=$(date +%s)
.venv/bin/memssl-grid experiments/removal_demo.yml
echo "== the removal demonstration took $(( $(date +%s) - t1 )) s"
echo "== building the book"
t1=$(date +%s)
.venv/bin/memssl-book .
echo "== the book took $(( $(date +%s) - t1 )) s"
echo "== done in $(( $(date +%s) - t0 )) s; open _build/html/intro.html in a browser"
