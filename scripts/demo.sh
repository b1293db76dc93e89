#!/usr/bin/env bash
# The main job on a local archive (see scripts/demo.py): real checkpoints, archived as model versions,
# verified, with a summary of what was stored. Usage: scripts/demo.sh [ARCHIVE_DIR] [--small]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/demo.py "$@"
