#!/usr/bin/env bash
# Set up ./.venv and run the main job on the built-in default: prepare the built-in
# corpus (Python's own documentation topics: no download), then a small real sweep on
# CPU (examples/smoke.yaml: 6 tiny trials, 2 at a time, a few minutes) that ends with
# the Pareto table and the report's plots.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
if [ ! -f runs/demo/data/manifest.json ]; then
  loopgolf data prepare --vocab-size 1024 --out runs/demo/data
fi
name="smoke-$(date +%Y%m%d-%H%M%S)"
loopgolf sweep examples/smoke.yaml --name "$name" "$@"
