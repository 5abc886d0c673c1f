"""Record a real table of `tiny` trials for the search replay (bench/replay_search.py).

    OMP_NUM_THREADS=1 python bench/record_search_table.py --data DIR --work DIR --out bench/data/search_table.parquet

A grid over `shared_vs_unique` with routed refinement on and off (GRID: 48
configurations), each trained for `--seeds` seeds with `run_trial` in this one process
(about one core). A row per trial: the grid's values, the seed, the final metrics
(val_bpb, artifact_bytes, eval_flops_per_token, predicted bytes, status) and the
learning curve (quick val bpb against training seconds, from the progress reports).

Configurations are made the way the sweep makes them (`derive`, from the sweep's
base), so the replay's suggestions map onto these rows exactly. Resumable: rows are
appended to the Parquet file (rewritten atomically after each trial) and a rerun skips
the (configuration, seed) pairs already there.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from loopgolf.atomic import atomic_write
from loopgolf.search_spaces.spaces import config_id, derive
from loopgolf.trial.config import TrialConfig, preset
from loopgolf.trial.train import run_trial

ARTIFACT_CAP = 1_000_000
TRAIN_SECONDS = 6.0
# The grid, in the order of the search space's fields (the replay reads it back from the table).
GRID: dict[str, tuple[int, ...]] = {
    "n_blocks": (1, 2, 3, 4),
    "n_passes": (1, 2, 3),
    "d_model": (64, 128),
    "refine_passes": (0, 1),
}
# Fixed under the grid: the demo's trial shape, with short evaluations and frequent reports.
BASE: dict[str, Any] = {
    "batch_size": 16,
    "eval_tokens": 4096,
    "calibration_tokens": 4096,
    "quick_eval_tokens": 2048,
    "signal": "entropy",
    "bits": 6,
    "codec": "lzma",
    "n_prelude": 0,
    "n_coda": 0,
    "report_every_seconds": 0.5,
    "checkpoint_every_seconds": 1000.0,
    "compile": "off",
    "device": "cpu",
    "train_seconds": TRAIN_SECONDS,
    "max_artifact_bytes": ARTIFACT_CAP,
}
FINAL = ("status", "val_bpb", "artifact_bytes", "eval_flops_per_token", "predicted_artifact_bytes",
         "train_seconds", "train_steps", "wall_seconds")  # fmt: skip


def base_config() -> TrialConfig:
    return TrialConfig.from_flat(BASE, base=preset("tiny"))


def grid_points() -> list[dict[str, int]]:
    return [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]


def record_one(point: dict[str, int], seed: int, data: Path, work: Path) -> dict[str, Any]:
    """Train one (configuration, seed) and return its row."""
    config = derive(point, base_config(), equal_bytes=False, byte_budget=ARTIFACT_CAP).replace(seed=seed)
    curve: list[tuple[float, float]] = []

    def reporter(progress: dict[str, Any], _state: Any) -> None:
        if "quick_val_bpb" in progress:
            curve.append((float(progress["elapsed_seconds"]), float(progress["quick_val_bpb"])))

    with tempfile.TemporaryDirectory(dir=work) as out:
        metrics = run_trial(config, data, out, reporter=reporter)
    row: dict[str, Any] = dict(point) | {"seed": seed, "config_id": config_id(config)}
    row |= {name: metrics.get(name) for name in FINAL}
    row["curve_seconds"] = [t for t, _ in curve]
    row["curve_bpb"] = [b for _, b in curve]
    return row


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    frame = pd.DataFrame(rows)
    atomic_write(path, lambda f: frame.to_parquet(f, index=False, compression="zstd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a prepared data dir (loopgolf data prepare)")
    parser.add_argument("--work", type=Path, required=True, help="scratch dir for the trials' artifacts")
    parser.add_argument("--out", type=Path, required=True, help="the table (Parquet); appended to, resumable")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != "1":
        raise SystemExit("OMP_NUM_THREADS=1 expected: the recording is meant to use one core")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = pd.read_parquet(args.out).to_dict("records") if args.out.exists() else []
    done = {(r["config_id"], r["seed"]) for r in rows}
    base_seed = base_config().train.seed
    # Seed-major order: an interrupted recording still covers every configuration.
    todo = [(p, base_seed + s) for s in range(args.seeds) for p in grid_points()]
    for index, (point, seed) in enumerate(todo):
        key = config_id(derive(point, base_config(), False, ARTIFACT_CAP).replace(seed=seed))
        if (key, seed) in done:
            continue
        tick = time.perf_counter()
        row = record_one(point, seed, args.data, args.work)
        rows.append(row)
        write_table(rows, args.out)
        print(
            f"[{index + 1}/{len(todo)}] {point} seed={seed} status={row['status']} val_bpb={row['val_bpb']} "
            f"bytes={row['artifact_bytes']} ({time.perf_counter() - tick:.1f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
