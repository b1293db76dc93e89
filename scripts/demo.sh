#!/usr/bin/env bash
# The main job on a local archive (see scripts/demo.py): real checkpoints, archived as model versions,
# verified, with a summary of what was stored. Usage: scripts/demo.sh [ARCHIVE_DIR] [--small]
# Paths are the caller's (relative ones from the current folder), so the commands it suggests work there.
set -euo pipefail
exec python "$(dirname "$0")/demo.py" "$@"
