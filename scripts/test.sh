#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (slow end-to-end tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
ruff check loopgolf tests bench
# Two worker processes (pytest-xdist); the tests that start Ray run one at a time in one of
# them (tests/conftest.py). LOOPGOLF_TEST_WORKERS=0 runs everything in this process.
python -m pytest -n "${LOOPGOLF_TEST_WORKERS:-2}" --dist loadgroup "$@"
