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

from loopgolf.orchestrator.spec import spec_from_dict
from loopgolf.orchestrator.sweep import run_sweep
from loopgolf.trial.prepare import PrepareConfig, prepare

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial-seconds", type=float, nargs="+", default=[60.0, 10.0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(PrepareConfig(data, (SHARED / "corpora" / "tinyshakespeare.txt",),
                              SHARED / "tokenizers" / "fineweb_1024_bpe.model"))
        for seconds in args.trial_seconds:
            spec = spec_from_dict({
                "name": f"bench{int(seconds)}", "data": str(data), "storage": str(Path(tmp) / "sweeps"),
                "space": "shared_vs_unique",
                "overrides": {"n_blocks": [1, 2], "n_passes": [1, 2], "n_prelude": 0, "n_coda": 0, "d_model": 64},
                "base": {"preset": "tiny", "batch_size": 16, "eval_tokens": 8192, "quick_eval_tokens": 2048,
                         "report_every_seconds": max(2.0, seconds / 6),
                         "checkpoint_every_seconds": max(4.0, seconds / 3)},
                "budget": {"artifact_bytes": 16_000_000, "train_seconds": seconds},
                "search": {"algorithm": "random", "objectives": {"val_bpb": "min"}, "num_samples": args.trials},
                "max_concurrent": args.concurrency, "resources": {"cpu": 1},
            })  # fmt: skip
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
