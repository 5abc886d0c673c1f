"""Sweep efficiency on local Ray: how much of the wall clock the trials spend training.

Run: .venv/bin/python bench/bench_sweep.py [--trial-seconds 60 10] [--trials 4] [--concurrency 2]

efficiency = sum of trial train_seconds / (sweep wall time x concurrency)
overhead per trial = (wall x concurrency - sum of train_seconds) / trials
The wall time includes starting Ray, every trial's evaluation and compression, and the
final report; each trial uses one CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import prepare_shakespeare, tiny_sweep_spec  # bench/common.py (the script's own directory)

from loopgolf.orchestrator.spec_file import spec_from_dict
from loopgolf.orchestrator.sweep import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial-seconds", type=float, nargs="+", default=[60.0, 10.0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_shakespeare(data)
        for seconds in args.trial_seconds:
            spec = spec_from_dict(tiny_sweep_spec(
                f"bench{int(seconds)}", data, Path(tmp) / "sweeps", seconds, args.trials, args.concurrency
            ))
            start = time.perf_counter()
            run_sweep(spec)
            wall = time.perf_counter() - start
            trials = pd.read_parquet(Path(spec.sweep_dir) / "results" / "trials.parquet")
            trained = float(trials["train_seconds"].sum())
            print(f"{seconds:g}-s trials x {len(trials)}, concurrency {args.concurrency}: wall {wall:.1f} s, "
                  f"efficiency {trained / (wall * args.concurrency):.3f}, "
                  f"overhead {(wall * args.concurrency - trained) / len(trials):.1f} s per trial")


if __name__ == "__main__":
    main()
