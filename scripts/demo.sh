#!/usr/bin/env bash
# Set up ./.venv and run the main job on the built-in default: prepare the built-in
# corpus (Python's own documentation topics: no download), then run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
out="${LOOPGOLF_DEMO_DIR:-runs/demo}"
if [ ! -f "$out/data/manifest.json" ]; then
  loopgolf data prepare --vocab-size 1024 --out "$out/data"
fi
