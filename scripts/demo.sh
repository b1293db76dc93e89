#!/usr/bin/env bash
# The main job on a local archive: make real training checkpoints (pretrained all-MiniLM-L6-v2 and
# a short Adam fine-tune of it, a CNN trained with SGD on scikit-learn digits), archive each run as
# a lineage chain, and print what was stored and how. Usage: scripts/demo.sh [ARCHIVE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:-./demo-archive}
export GPUPAS_BENCH_CACHE=${GPUPAS_BENCH_CACHE:-$PWD/demo-checkpoints}
python benchmarks/checkpoints.py   # trains once (about a minute on 2 cores), then reads its cache
[ -f "$archive/zarr.json" ] || gpupas init "$archive"
export GPUPAS_ARCHIVE=$archive
if ! gpupas show minilm-ft >/dev/null 2>&1; then
  gpupas import "$GPUPAS_BENCH_CACHE/minilm-fp32" --name minilm-ft --hp optimizer=adam --hp lr=3e-5 \
    -m "all-MiniLM-L6-v2, then a short Adam fine-tune"
  gpupas import "$GPUPAS_BENCH_CACHE/cnn-sgd" --name cnn-digits --hp optimizer=sgd --hp lr=0.05 \
    -m "small CNN on scikit-learn digits, one checkpoint per epoch"
fi
gpupas log
gpupas stats
gpupas show minilm-ft
gpupas verify
