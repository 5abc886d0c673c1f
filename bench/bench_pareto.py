"""Benchmark: pareto_front on 1e6 trials (goal: < 2 s for 3 objectives) and load_results on 1e5.

    python bench/bench_pareto.py [--rows 1000000] [--load-rows 100000] [--repeat 3]

Prints one line per figure (best of --repeat runs, wall-clock seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from loopgolf.analysis.pareto import pareto_front, pareto_rank
from loopgolf.analysis.results import TRIALS_FILE, load_results, trials_schema, write_table
from loopgolf.trial.config import TrialConfig


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def objective_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """Trials with plausible objectives: val_bpb falls with bytes and with eval FLOPs, plus noise."""
    rng = np.random.default_rng(seed)
    log_bytes = rng.uniform(np.log(2e6), np.log(16e6), rows)
    log_flops = rng.uniform(np.log(1e6), np.log(1e8), rows)
    val_bpb = 2.2 - 0.12 * log_bytes / np.log(16e6) - 0.08 * log_flops / np.log(1e8) + rng.normal(0, 0.02, rows)
    return pd.DataFrame(
        {
            "status": np.where(rng.random(rows) < 0.95, "complete", "rejected"),
            "feasible": rng.random(rows) < 0.9,
            "val_bpb": val_bpb,
            "artifact_bytes": np.exp(log_bytes).astype(np.int64),
            "eval_flops_per_token": np.exp(log_flops),
        }
    )


def trials_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """A full-width trials table: every config field, every metric, refinement lists on a third of rows."""
    rng = np.random.default_rng(seed)
    flat = TrialConfig().to_flat()
    df = pd.DataFrame({k: [v] * rows if isinstance(v, list) else np.repeat(v, rows) for k, v in flat.items()})
    df["d_model"] = rng.choice([64, 128, 256, 512], rows)
    df["n_passes"] = rng.integers(1, 5, rows)
    df["signal"] = rng.choice(["entropy", "margin", "resid_norm", "kl", "uniform", "random"], rows)
    df["refine_passes"] = rng.integers(0, 3, rows)
    df["sweep"] = "bench"
    df["trial_id"] = [f"t{i:07d}" for i in range(rows)]
    df["status"] = "complete"
    df["config_id"] = [f"c{i // 3:07d}" for i in range(rows)]
    df["seed"] = np.arange(rows) % 3
    df["started_at"] = pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(np.arange(rows), unit="s")
    for metric in ("val_bpb", "val_bpb_prequant", "val_loss", "eval_seconds", "eval_flops_per_token"):
        df[metric] = rng.random(rows)
    for metric in ("artifact_bytes", "model_bytes", "params", "train_tokens", "train_steps"):
        df[metric] = rng.integers(1, 16_000_000, rows)
    df["feasible"] = True
    deciles = [list(rng.normal(0, 0.1, 10)) for _ in range(rows // 3)]
    df["decile_ce_delta"] = pd.Series(deciles + [None] * (rows - len(deciles)), dtype=object)
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--load-rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    df = objective_frame(args.rows)
    three = {"val_bpb": "min", "artifact_bytes": "min", "eval_flops_per_token": "min"}
    two = {"val_bpb": "min", "artifact_bytes": "min"}
    seconds, front = best_of(args.repeat, lambda: pareto_front(df, three))
    print(f"pareto_front {args.rows:,} rows x 3 objectives: {seconds:.3f} s ({len(front)} on the front; goal < 2 s)")
    seconds, front = best_of(args.repeat, lambda: pareto_front(df, two))
    print(f"pareto_front {args.rows:,} rows x 2 objectives: {seconds:.3f} s ({len(front)} on the front)")
    uniform = pd.DataFrame(np.random.default_rng(1).random((args.rows, 3)), columns=list("abc"))
    uniform["status"], uniform["feasible"] = "complete", True
    seconds, front = best_of(args.repeat, lambda: pareto_front(uniform, dict.fromkeys("abc", "min")))
    print(f"pareto_front {args.rows:,} rows x 3 uniform random objectives: {seconds:.3f} s ({len(front)} on the front)")
    small = df.head(10_000)
    seconds, ranks = best_of(1, lambda: pareto_rank(small, three))
    print(f"pareto_rank {len(small):,} rows x 3 objectives: {seconds:.3f} s ({int(ranks.max()) + 1} ranks)")

    trials = trials_frame(args.load_rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_sweep" / TRIALS_FILE
        seconds, _ = best_of(1, lambda: write_table(trials, path, trials_schema()))
        size = path.stat().st_size / 1e6
        print(f"write_table {args.load_rows:,} trials x {len(trials.columns)} columns: {seconds:.3f} s ({size:.1f} MB)")
        seconds, loaded = best_of(args.repeat, lambda: load_results(path.parent.parent))
        print(f"load_results {args.load_rows:,} trials: {seconds:.3f} s ({loaded.shape[1]} columns)")
        seconds, _ = best_of(args.repeat, lambda: pd.read_parquet(path))
        print(f"plain pandas.read_parquet of the same file: {seconds:.3f} s")


if __name__ == "__main__":
    main()
