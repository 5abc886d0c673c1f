"""Per-module mutation scores and the surviving mutants of the last `mutmut run`.

Reads mutmut's own listing (`mutmut results --all true`: one `name: status` line per
mutant) and, for each survivor, its diff (`mutmut show NAME`). Run from the repository
root after `mutmut run`; `bench/mutation.sh` does both.

Score = detected / (detected + undetected), per module. Detected: killed by a failing
test, or timed out (the mutant made a test run past its time limit). Undetected:
survived, or no test executes the mutated function ("no tests"), or "suspicious" (the
tests passed but slowly). Mutants mutmut did not check are left out and counted apart.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict

DETECTED = {"killed", "timeout", "caught by type check"}
UNDETECTED = {"survived", "no tests", "suspicious"}
_NAME = re.compile(r"^(?P<module>[\w.]+?)\.x(?:_|ǁ)")


def module_of(mutant: str) -> str:
    """`loopgolf.trial.config.xǁModelConfigǁ__post_init____mutmut_3` -> `loopgolf.trial.config`."""
    match = _NAME.match(mutant)
    if not match:
        raise ValueError(f"mutant name {mutant!r}: expected MODULE.x_FUNCTION__mutmut_N or MODULE.xǁCLASSǁ...")
    return match.group("module")


def read_results(mutmut: str) -> dict[str, str]:
    out = subprocess.run([mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    results = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            results[name] = status
    return results


def scores(results: dict[str, str]) -> dict[str, Counter]:
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in results.items():
        per_module[module_of(name)][status] += 1
    return per_module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutmut", default="mutmut", help="the mutmut executable")
    parser.add_argument("--goal", type=float, default=85.0, help="per-module score to meet, in percent")
    parser.add_argument("--no-diffs", action="store_true", help="list survivors without their diffs")
    args = parser.parse_args(argv)

    results = read_results(args.mutmut)
    if not results:
        print("no mutants recorded: run `mutmut run` first", file=sys.stderr)
        return 1
    per_module = scores(results)
    print(f"{'module':42} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} "
          f"{'other':>5} {'score':>7}")  # fmt: skip
    below = []
    total_detected = total_counted = 0
    for module in sorted(per_module):
        counts = per_module[module]
        detected = sum(counts[s] for s in DETECTED)
        counted = detected + sum(counts[s] for s in UNDETECTED)
        other = sum(counts.values()) - counted
        score = 100.0 * detected / counted if counted else float("nan")
        total_detected, total_counted = total_detected + detected, total_counted + counted
        if counted and score < args.goal:
            below.append(module)
        undetected = counts["survived"] + counts["suspicious"]
        print(f"{module:42} {sum(counts.values()):7d} {counts['killed']:7d} {counts['timeout']:7d} "
              f"{undetected:8d} {counts['no tests']:8d} {other:5d} {score:6.1f}%")  # fmt: skip
    if total_counted:
        print(f"{'all':42} {total_counted:7d} {'':7} {'':7} {'':8} {'':8} {'':5} "
              f"{100.0 * total_detected / total_counted:6.1f}%")  # fmt: skip
    print()
    survivors = sorted(name for name, status in results.items() if status in UNDETECTED)
    print(f"{len(survivors)} undetected mutant(s)")
    for name in survivors:
        if args.no_diffs:
            print(f"  {name}: {results[name]}")
            continue
        diff = subprocess.run([args.mutmut, "show", name], capture_output=True, text=True).stdout
        print(diff.rstrip())
        print()
    if below:
        print(f"below {args.goal:g}%: {', '.join(below)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
