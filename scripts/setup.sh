#!/usr/bin/env bash
# Create or refresh ./.venv with loopgolf and its dependencies. Sourced by demo.sh and test.sh.
# torch is installed first and pinned (torch==2.13.0): on a CPU machine that is the local CPU
# wheel; an unpinned torch would pull gigabytes of CUDA packages. On a GPU machine, install
# the CUDA build of your choice into .venv first; this script keeps whatever torch it finds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${LOOPGOLF_PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
fi
stamp="$venv/.loopgolf-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    "$venv/bin/pip" install --quiet "torch==2.13.0"
  fi
  echo "[setup] installing loopgolf and its dependencies (a minute or two the first time)"
  "$venv/bin/pip" install --quiet -e "$root[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
