#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (slow end-to-end tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
ruff check loopgolf tests bench
python -m pytest "$@"
