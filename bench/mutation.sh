#!/usr/bin/env bash
# Mutation testing benchmark: how many small semantic changes to the pure, fast-to-test
# modules does the fast test suite catch? Prints the score per module and every mutant
# that survived, with its diff. A benchmark, not part of CI: some 4,000 mutants, each
# running the tests that execute its function, so it takes a while (tens of minutes on an
# idle 2-core machine; far longer on a loaded one). Run a subset while iterating.
#
#   bash bench/mutation.sh                       # every module in [tool.mutmut] only_mutate, from scratch
#   bash bench/mutation.sh --keep 'loopgolf.trial.config.*'   # re-check those mutants, keep other results
#
# mutmut (3.x, in the dev extra) copies the package into ./mutants, rewrites each function
# of the listed modules into a trampoline over its mutated variants, records which tests
# run which function, then for each mutant runs only those tests (fastest first, stopping
# at the first failure). Modules and the test selection live in pyproject.toml
# [tool.mutmut]: the modules in `only_mutate`, the tests in
# `pytest_add_cli_args_test_selection` (the fast tests mirroring those modules, `-m "not slow"`).
# The challenge-data tests join when LOOPGOLF_CHALLENGE_DATA is set (see the README).
# MUTATION_JOBS sets the parallel workers (default: the CPU count).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  export PATH="$root/.venv/bin:$PATH"
fi
command -v mutmut >/dev/null || { echo "mutmut not found: pip install -e '.[dev]'" >&2; exit 2; }
export OMP_NUM_THREADS=1
# The tests must import the mutated copy in ./mutants, never another checkout: mutmut puts
# ./mutants first on its own sys.path, and this makes the interpreters the tests start do
# the same (an inherited PYTHONPATH, or an editable install of another worktree, would not).
export PYTHONPATH="$root/mutants"

keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
if [ "$keep" = 0 ]; then rm -rf mutants; fi
# Which tests run which function is recorded once; after the tests change, a kept record
# lost the other modules' tests (their mutants all read "no tests"), so --keep records it again.
if [ "$keep" = 1 ]; then rm -f mutants/mutmut-stats.json; fi

cpus="$(nproc --all)"  # plain nproc obeys the OMP_NUM_THREADS=1 set above
jobs="${MUTATION_JOBS:-$cpus}"
echo "# mutmut $(mutmut --version 2>/dev/null | awk '{print $NF}' || true), $jobs worker(s), $cpus CPU(s)"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
# mutmut's progress line redraws itself; keep the log readable. The whole log (a failing
# clean run's pytest output included) stays in mutants/run.log.
mkdir -p mutants
mutmut run --max-children "$jobs" "$@" 2>&1 | tr '\r' '\n' | grep -v -E '^\s*[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' \
  | tee mutants/run.log | tail -n 5
end=$(date +%s)
echo "# wall time: $((end - start)) s; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python bench/mutation_report.py
